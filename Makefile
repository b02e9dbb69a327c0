# Quick start: `make demo` runs the main job, `make test` runs the tests. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint families-table clean

$(STAMP): setup.cfg pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-sara demo --output-dir outputs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check hf_sara tests examples utils benchmarks
	$(BIN)/ruff format --check hf_sara tests examples utils benchmarks

families-table: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python utils/families_table.py --write README.md

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
