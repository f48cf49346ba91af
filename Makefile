# hgsp: `make demo` prunes the offline demo model, `make test` runs the test suite.
# Both create the virtual environment and install everything they need first.

PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install. The default is the CPU build; a GPU user sets e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# Where `hgsp fetch-assets` caches the demo model and data (default of the tool itself).
export HGSP_HOME ?= $(HOME)/.cache/hgsp
# Evaluation text kept beside a checkout (WikiText-2 test, PTB), used when present.
SHARED_DATA := $(wildcard $(CURDIR)/../shared/data)
export HGSP_DATA_DIR ?= $(SHARED_DATA)
# The Hugging Face Hub is never needed for the demo or the tests.
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

BIN := $(VENV)/bin
DEMO_MODEL := $(HGSP_HOME)/models/SmolLM2-135M-Instruct
DEMO_RATIO ?= 0.5
PYTEST_ARGS ?=

.PHONY: install assets demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,eval]"
	touch $@

install: $(VENV)/.installed

assets: install
	$(BIN)/hgsp fetch-assets model c4

demo: assets
	$(BIN)/python run_global_pruning.py --base_model $(DEMO_MODEL) \
	  --output_name demo_$(DEMO_RATIO) --pruning_ratio $(DEMO_RATIO) --dataset c4 --overwrite

test: assets
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Unit tests only: no demo model needed.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
