# make demo: the main job on the embedded data.  make test: the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run
# DDP ranks for the demo bag: 1 here, because on 2 cores two ranks are slower at the same global batch
# (docs/BENCHMARKS.md); `make demo DEMO_PROCS=2` trains each member under torchrun with 2 gloo ranks
DEMO_PROCS ?= 1
DEMO_BAG := $(if $(filter 1,$(DEMO_PROCS)),$(PY) -m launch.bag,OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(DEMO_PROCS) -m launch.bag)

.PHONY: install demo test lint clean

install: $(STAMP)

# exact tested versions from constraints.txt; torch/torchvision are PyPI's CUDA builds (run on CPU too)
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dali,test]'
	touch $@

# 5,000 MNIST digits -> 20 verified shards -> a bag of 2 ResNet-18 members on bootstrap resamples
# (conf/experiment/demo.yaml) -> report of each member and the ensemble (table, per-class CSV, confusion
# and reliability PNGs) -> the bag's embeddings and the digits' five native measurements exported, and
# classical heads on them (random forest on native only and on native + PCA(deep), logistic regression,
# linear SVM) -> compare.md, the bag beside the heads on the test split, printed last.
# Running it again resumes the finished runs, which then have nothing left to do.
demo: install
	$(PY) -m shards.build source=demo out=$(DEMO_DIR)/shards shard.maxcount=250
	$(PY) -m shards.verify dir=$(DEMO_DIR)/shards
	$(DEMO_BAG) experiment=demo bag.members=2 data.shards=$(DEMO_DIR)/shards run_dir=$(DEMO_DIR)/bag
	$(PY) -m launch.evaluate bag=$(DEMO_DIR)/bag data.shards=$(DEMO_DIR)/shards data.split=test workers=1 \
		logger.mode=offline
	$(PY) -m launch.features bag=$(DEMO_DIR)/bag data.shards=$(DEMO_DIR)/shards workers=1 format=parquet
	$(PY) -m launch.head features=$(DEMO_DIR)/bag/features head=random_forest inputs=native
	$(PY) -m launch.head features=$(DEMO_DIR)/bag/features head=random_forest
	$(PY) -m launch.head features=$(DEMO_DIR)/bag/features head=logistic
	$(PY) -m launch.head features=$(DEMO_DIR)/bag/features head=linear_svm
	cat $(DEMO_DIR)/bag/features/heads/compare.md

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
