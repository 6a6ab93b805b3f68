# make demo: the main job on the embedded data.  make test: the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run

.PHONY: install demo test lint clean

install: $(STAMP)

# exact tested versions from constraints.txt; torch/torchvision are PyPI's CUDA builds (run on CPU too)
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dali,test]'
	touch $@

demo: install
	$(PY) -m shards.build source=demo out=$(DEMO_DIR)/shards
	$(PY) -m shards.verify dir=$(DEMO_DIR)/shards

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
