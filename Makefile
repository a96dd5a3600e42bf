# The README's two commands: `make demo` and `make test`. Both install first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PIN)
	touch $@

demo: install
	$(BIN)/mpiexec -n 2 $(BIN)/hpc-lensiam simulate --out shards/demo --pairs 64 --shard-size 16 --seed 0
	$(BIN)/hpc-lensiam show shards/demo --out shards/demo/pairs.png -n 8

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/simulate.py
