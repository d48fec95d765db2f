# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-node signals lint clean calibrate bench-service-fuzz bench-service-load bench-service-crash

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/poi demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/core.py

bench-node: $(STAMP)
	$(BIN)/python bench/node.py

# intake load (SQLite and PostgreSQL) and 20 SIGKILL crash runs; merge into bench/results/service.json
bench-service-load: $(STAMP)
	$(BIN)/python bench/service_load.py

bench-service-crash: $(STAMP)
	$(BIN)/python bench/service_crash.py

# >= 100,000 fuzz cases against the control plane (default bound 1800 s); merges into bench/results/service.json
bench-service-fuzz: $(STAMP)
	$(BIN)/python bench/service_fuzz.py --max-seconds $(or $(FUZZ_SECONDS),1800)

signals: $(STAMP)
	$(BIN)/python bench/signals.py

calibrate: $(STAMP)
	$(BIN)/python bench/calibrate.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) poi-demo .pytest_cache
