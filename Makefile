# The two commands a newcomer needs:  `make bench` (install + run the main job)  and  `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test test-cpu test-triton cuda-check bench peer-suites peer-suite-peft

# torch is pinned to the CPU wheel and installed first, on its own: an unpinned torch (or a package asking
# for one) would download a multi-GB CUDA build. The extension builds against that torch
# (--no-build-isolation), so nothing else is pulled in.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q ninja numpy triton==3.9.0 pytest pytest-benchmark hypothesis expecttest tqdm pyyaml safetensors matplotlib
	$(PIP) install -q peft==0.21.2 mergekit==0.1.5
	$(PIP) install -q --no-build-isolation --no-deps -e .

cuda-check:
	bash tools/check_cuda.sh

test-cpu:
	$(PYTHON) -m pytest -q -m "not triton"

test-triton:
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -m triton

test: install cuda-check test-cpu test-triton peer-suite-peft

bench: install
	$(PYTHON) -m pykernels bench

# peft's and mergekit's own tests, unpatched and with our drop-in backends (downloads their sdists once)
peer-suites: peer-suite-peft
	bash tools/peer_suites/mergekit_suite.sh

# in `make test`: about 70 s, needs only PyPI (mergekit's suite also needs a file from GitHub)
peer-suite-peft:
	bash tools/peer_suites/peft_suite.sh
