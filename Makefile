# Two commands a new user runs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The GPU check runs where the GPU is: with .venv when there is one, else the machine's python3 (see
# docs/samplers.md "GPU check" for a GPU machine without .venv).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: test demo install clean-venv gpu-check

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A matched torch/torchvision pair (see docs/installation.md for why this one).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

gpu-check:
	$(GPU_PYTHON) -m pytest -q -m gpu tests/test_gpu.py
	$(GPU_PYTHON) bench/gpu.py

demo: $(STAMP)
	$(PY) demo/run_demo.py

clean-venv:
	rm -rf $(VENV)
