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

# 5,000 MNIST digits -> 20 shards -> 2 epochs of ResNet-18 on CPU (a few minutes); running it again
# resumes the finished run, which then has nothing left to do
demo: install
	$(PY) -m shards.build source=demo out=$(DEMO_DIR)/shards shard.maxcount=250
	$(PY) -m shards.verify dir=$(DEMO_DIR)/shards
	$(PY) -m launch.train data.shards=$(DEMO_DIR)/shards run_dir=$(DEMO_DIR)/train \
	    model.name=resnet18 data.crop_size=28 data.scale='[0.35,1.0]' loader.batch_size=64 loader.workers=1 \
	    optim.base_lr=0.4 schedule.warmup_epochs=0.5 trainer.epochs=2 trainer.log_every=10 logger.mode=offline

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
