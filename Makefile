# The two commands a new machine needs (each creates the virtualenv it needs first):
#   make demo   - the whole pipeline on embedded defaults (ephemeral Prefect, sqlite MLflow, digits)
#   make test   - the test suite, exactly as CI runs it
#   make test-fast - everything but the tests marked slow or integration (a few minutes on a laptop)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test test-fast venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/vitdistill run

test: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -m "not slow and not integration"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_linear_probe.py
	$(BIN)/python benchmarks/bench_probe_teachers.py
	$(BIN)/python benchmarks/bench_lit.py
	$(BIN)/python benchmarks/bench_distill.py
	$(BIN)/python benchmarks/bench_teachers.py
	$(BIN)/python benchmarks/bench_distill_quality.py --data shapes
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_cli.py

clean:
	rm -rf $(VENV) vitdistill-cache mlflow.db mlruns
