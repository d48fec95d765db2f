# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-full test bench bench-node signals lint clean calibrate bench-service-fuzz bench-service-load bench-service-crash \
	reliability peers detection-floor speculative bf16-int8 train-model classifier gateway exact exact-service audit-throughput report zk

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/poi demo

# the whole attack catalogue on gpt2-small, poi-lm (speculative too) and MiniLM (~30 min on 2 cores)
demo-full: $(STAMP)
	$(BIN)/poi demo --full

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

# issue 10: error rates with confidence bounds on the trained model (bench/results/reliability.json)
reliability: $(STAMP)
	$(BIN)/python bench/reliability.py

peers: $(STAMP)
	$(BIN)/python -c "import toploc" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt \
		--no-build-isolation --no-binary toploc toploc==0.1.6 || echo "TOPLOC not built; bench/peers.py skips it"
	$(BIN)/python bench/peers.py

# audits/s of the process pool and Ray actors, 1 and 2 workers (merges into bench/results/gateway.json)
audit-throughput: $(STAMP)
	$(BIN)/python bench/audit_throughput.py

detection-floor: $(STAMP)
	$(BIN)/python bench/detection_floor.py

speculative: $(STAMP)
	$(BIN)/python bench/speculative.py

# L1's workload classifier: 4 rounds of resident recordings on two models, leave-one-trial-out (~12 min)
classifier: $(STAMP)
	$(BIN)/python bench/classifier.py

# issue 11: the OpenAI gateway end to end (overhead, live detection latency, honest cuts; ~8 min)
gateway: $(STAMP)
	$(BIN)/python bench/gateway.py

# issue 12: L3 exact audits and disputes (trace cost, Freivalds vs recompute, ~1B shapes; ~4 min)
exact: $(STAMP)
	$(BIN)/python bench/exact.py

# issue 12: the exact tier through a control plane and node on loopback (challenges, disputes; ~5 min)
exact-service: $(STAMP)
	$(BIN)/python bench/exact_service.py

# issue 13: EZKL proofs of one block half per width and per setting (bench/results/zk.json; ~40 min)
zk: $(STAMP)
	$(BIN)/python bench/zk.py

bf16-int8: $(STAMP)
	$(BIN)/python bench/bf16_int8.py

# retrains poi-lm and poi-lm-draft (~22 min on 2 cores); the registry's digests must then be updated
train-model: $(STAMP)
	$(BIN)/python bench/train_model.py

# issue 14: the research report from bench/results/*.json -> docs/report/build/report.{html,pdf}
report: $(STAMP)
	$(BIN)/python -m maxwell_poi.report.build

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) poi-demo .pytest_cache
