# Two commands on a fresh clone (README): `make demo` runs the whole tiny pipeline, `make test` the suite.
# Both create .venv on first use. Python 3.11 and pip are all a machine needs.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean-artifacts

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The whole lifecycle on the embedded default: no services, CPU, tiny preset.
demo: setup
	$(BIN)/kelix pipeline run --preset tiny --params params.yaml

# Every test, the tiny end-to-end pipeline included.
test: setup
	$(BIN)/python -m pytest -q

# Unit tests only (seconds to a few minutes).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not services"

clean-artifacts:
	rm -rf artifacts mlruns mlflow.db mlartifacts
