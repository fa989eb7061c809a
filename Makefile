# Two commands on a fresh machine:  `make run`  and  `make test`.
# Both create .venv, install the pinned PyTorch first (PyPI's Linux wheel is
# the CUDA build; TORCH_PIP_ARGS below selects the CPU one), then medfed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. the CPU wheel index:
#   make run TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
DATA ?= $(or $(MEDFED_DATA_DIR),$(HOME)/.cache/medfed/data)
OUT ?= runs/diabetes130
PYTEST_ARGS ?=

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $@

# `make run` replaces the previous run in $(OUT) (--overwrite), so it repeats.
run: install
	@if [ ! -e "$(DATA)/dataset_diabetes.zip" ] && [ ! -e "$(DATA)/diabetic_data.csv" ]; then \
	  $(BIN)/medfed data fetch --dest "$(DATA)"; fi
	MEDFED_DATA_DIR="$(DATA)" $(BIN)/medfed run configs/diabetes130.toml --out $(OUT) --overwrite

test: install
	MEDFED_DATA_DIR="$(DATA)" $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
