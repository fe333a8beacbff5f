"""Drop-in backends that route other tools' merge functions through pykernels (DESIGN.md section 7): peft, mergekit."""
