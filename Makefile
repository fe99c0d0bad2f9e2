# Two entry points (see README): `make train` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

WORKDIR ?= runs/mlm_linformer_cpu

.PHONY: train demo test docs docs-screenshots setup clean

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

# The docs extra (Sphinx, MyST, the theme): the test command builds the site, and tests/test_docs.py needs it.
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

test: $(DOCS_STAMP)
	$(PY) -m pytest -n 2 tests
	$(MAKE) --no-print-directory docs

# HTML into docs/_build/html; any warning (a broken reference, an undocumented public name) fails the build.
docs: $(DOCS_STAMP)
	rm -rf docs/_autosummary
	$(PY) -m sphinx -b html -W --keep-going -q -j 2 docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# Screenshots of the built site (docs/_static/*.png) in headless Chromium; not part of CI.
docs-screenshots: docs
	$(PY) docs/screenshots.py docs/_build/html docs/_static

clean:
	rm -rf $(VENV) .pytest_cache docs/_build docs/_autosummary
