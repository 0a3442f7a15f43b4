# One virtual environment in .venv; torch is pinned first so that pip takes the CPU build where one is
# on disk (elsewhere PyPI's default build), then the project with its dev extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup test demo lint bench clean

$(BIN)/jimray: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/jimray

setup: $(BIN)/jimray

test: setup
	$(BIN)/ruff check jimray tests
	RAY_AUTH_MODE=disabled $(BIN)/pytest -q

demo: setup
	RAY_AUTH_MODE=disabled $(BIN)/jimray train jobs/quickstart.yaml

lint: setup
	$(BIN)/ruff check jimray tests

clean:
	rm -rf $(VENV) runs .pytest_cache
