"""Drop-in pykernels backends for other tools (peft, mergekit): see the submodules' patch() functions."""
