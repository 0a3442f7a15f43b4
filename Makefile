# One virtual environment in .venv; torch is pinned first so that pip takes the CPU build where one is
# on disk (elsewhere PyPI's default build), then the project with its dev extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup test demo lint bench clean

INSTALL_LOG := install.log

# Silent unless it fails: pip's output goes to $(INSTALL_LOG), printed (its last 60 lines) on a failure.
$(BIN)/jimray: pyproject.toml
	@( $(PY) -m venv $(VENV) \
	  && $(BIN)/pip install --upgrade pip \
	  && $(BIN)/pip install $(TORCH) \
	  && $(BIN)/pip install -e ".[dev]" ) > $(INSTALL_LOG) 2>&1 \
	  || { tail -n 60 $(INSTALL_LOG); echo "install failed: see $(INSTALL_LOG)"; exit 1; }
	@touch $(BIN)/jimray

setup: $(BIN)/jimray

test: setup
	$(BIN)/ruff check jimray tests
	RAY_AUTH_MODE=disabled $(BIN)/pytest -q

# The whole chain on the embedded structures: simulate -> train -> predict -> average -> report, ending on a
# summary table and runs/quickstart_pipeline/report.html (VERBOSE=1 shows Ray's worker logs).
demo: setup
	@RAY_AUTH_MODE=disabled $(BIN)/jimray run jobs/quickstart_pipeline.yaml $(if $(VERBOSE),--verbose)

lint: setup
	$(BIN)/ruff check jimray tests

clean:
	rm -rf $(VENV) runs .pytest_cache $(INSTALL_LOG)
