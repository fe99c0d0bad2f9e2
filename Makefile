# Two entry points (see README): `make train` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

WORKDIR ?= runs/mlm_linformer_cpu

.PHONY: train demo test setup clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) -m experiments.train --config configs/mlm_linformer.py:cpu --workdir $(WORKDIR)

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

clean:
	rm -rf $(VENV) .pytest_cache
