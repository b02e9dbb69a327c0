# Quick start: `make demo` runs the main job, `make test` runs the tests. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The oldest supported dependency set (setup.cfg's lower bounds), for the whole suite a second time.
FLOOR_VENV := .venv-floor
FLOOR_BIN := $(FLOOR_VENV)/bin
FLOOR_STAMP := $(FLOOR_VENV)/.installed
# Axolotl's pinned environment, for the Axolotl plugin's tests.
AXOLOTL_VENV := .venv-axolotl
AXOLOTL_BIN := $(AXOLOTL_VENV)/bin
AXOLOTL_STAMP := $(AXOLOTL_VENV)/.installed
# Where torch's CPU build comes from, e.g. TORCH_PIP_FLAGS="--index-url <a CPU wheel index>".
TORCH_PIP_FLAGS ?=

.PHONY: setup demo test test-floor test-axolotl lint families-table clean

$(STAMP): setup.cfg pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The floor set pinned, then hf_sara with its dependencies in the same environment: pip refuses if its lower bounds
# do not admit the floor set.
$(FLOOR_STAMP): setup.cfg pyproject.toml requirements-floor.txt
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_BIN)/python -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(FLOOR_BIN)/python -m pip install --quiet -r requirements-floor.txt
	$(FLOOR_BIN)/python -m pip install --quiet -e .
	$(FLOOR_BIN)/python -m pip check
	touch $(FLOOR_STAMP)

# torch first (a CPU build), then Axolotl and hf_sara in one resolution, with hf_sara's dependencies: pip refuses if
# hf_sara's requirements cannot stand beside Axolotl's pins.
$(AXOLOTL_STAMP): setup.cfg pyproject.toml requirements-axolotl.txt
	$(PYTHON) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_BIN)/python -m pip install --quiet --upgrade pip
	$(AXOLOTL_BIN)/python -m pip install --quiet torch==2.13.0 $(TORCH_PIP_FLAGS)
	$(AXOLOTL_BIN)/python -m pip install --quiet -r requirements-axolotl.txt -e .
	$(AXOLOTL_BIN)/python -m pip check
	touch $(AXOLOTL_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-sara demo --output-dir outputs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

test-floor: $(FLOOR_STAMP)
	HF_HUB_OFFLINE=1 $(FLOOR_BIN)/python -m pytest -q tests

test-axolotl: $(AXOLOTL_STAMP)
	HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 $(AXOLOTL_BIN)/python -m pytest -q tests/integrations tests/test_mixin.py

lint: $(STAMP)
	$(BIN)/ruff check hf_sara tests examples utils benchmarks
	$(BIN)/ruff format --check hf_sara tests examples utils benchmarks

families-table: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python utils/families_table.py --write README.md

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(AXOLOTL_VENV) build dist *.egg-info .pytest_cache .ruff_cache
