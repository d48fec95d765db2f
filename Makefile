# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-full test bench bench-node bench-contention signals lint clean calibrate bench-service-fuzz bench-service-load bench-service-crash \
	reliability peers detection-floor speculative bf16-int8 train-model classifier gateway exact exact-service audit-throughput report zk

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# the serving engines the tests run for real (issue 27): llama.cpp's server builds from source, ~14 min
# on 2 cores the first time (pip caches the wheel); not needed by `make demo`. GGML_NATIVE=OFF: a
# cached wheel must run on another CPU of the same architecture
ENGINES := $(VENV)/.engines
$(ENGINES): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[engines]'
	touch $(ENGINES)

demo: $(STAMP)
	$(BIN)/poi demo

# the whole attack catalogue on gpt2-small, poi-lm (speculative too) and MiniLM (~30 min on 2 cores)
demo-full: $(STAMP)
	$(BIN)/poi demo --full

test: $(STAMP) $(ENGINES)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

# bench/results/core.json: generation, receipt, L0 and L4 detection ratios (issue 2)
bench: $(STAMP)
	$(BIN)/python -m bench.audit.core

# bench/results/node.json: resident agents in measured sandboxes (issue 8)
bench-node: $(STAMP)
	$(BIN)/python -m bench.node.resident

# bench/results/operation.json (contention_*): honest and cheating resident leases under 0-2 CPU hogs (issue 23)
bench-contention: $(STAMP)
	$(BIN)/python -m bench.node.contention

# bench/results/integrity.json (work_probe_honest, padded_*): the work probe against padding, and its honest false rejects (~13 min)
.PHONY: bench-integrity
bench-integrity: $(STAMP)
	$(BIN)/python -m bench.node.integrity

# bench/results/integrity.json (honest_affirmed_by_threads): honest agents and L1's cheats at 1, 2 and N torch threads, a CPU hog beside a third (~10 min)
.PHONY: bench-threads
bench-threads: $(STAMP)
	$(BIN)/python -m bench.node.threads

# bench/results/integrity.json (unverified_tokens_delivered): streamed chats through poi serve's gateway, verified vs immediate delivery, honest and cut cheaters (~5 min)
.PHONY: bench-gateway-delivery
bench-gateway-delivery: $(STAMP)
	$(BIN)/python -m bench.service.gateway_delivery --honest 20 --cut 5

# bench/results/gateway.json (gateway_overhead_ratio, gateway_load): the gateway's fixed cost by stage, and 8 and 32 concurrent streams (~8 min)
.PHONY: bench-gateway-cost
bench-gateway-cost: $(STAMP)
	$(BIN)/python -m bench.service.gateway_cost --n 30

# bench/results/integrity.json (sandbox_escape): escape attempts against confined and unconfined sandboxes, honest resident leases flagged (~2 min; needs root)
.PHONY: bench-escape
bench-escape: $(STAMP)
	$(BIN)/python -m bench.node.escape

# bench/results/operation.json (profit_*): money per lease of each economic cheat vs honest, through the control plane (~10 min; TRIALS=4 for a smoke run)
.PHONY: bench-profit
bench-profit: $(STAMP)
	$(BIN)/python -m bench.economics.profit --trials $(or $(TRIALS),50)

# bench/results/operation.json (system_*): >= 3,000 honest leases through poi serve --local-node, a CPU hog for a third (issue 23; LEASES=200 for a smoke run)
.PHONY: bench-demo-runs
bench-demo-runs: $(STAMP)
	$(BIN)/python -m bench.service.demo_runs --runs $(or $(RUNS),3)

.PHONY: bench-system
bench-system: $(STAMP)
	$(BIN)/python -m bench.service.system --leases $(or $(LEASES),3000)

# bench/results/service.json (intake_*, load_*): intake load on SQLite and PostgreSQL
bench-service-load: $(STAMP)
	$(BIN)/python -m bench.service.load --mixed

# bench/results/service.json (settlement_cost): intake's settlement, general postings vs ledger.settle (issue 25)
.PHONY: bench-settle-cost
bench-settle-cost: $(STAMP)
	$(BIN)/python -m bench.service.settle_cost

# bench/results/service.json (intake_profile) + intake_profile.stacks.txt: poi serve sampled by py-spy under intake load (issue 25)
.PHONY: bench-intake-profile
bench-intake-profile: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[profile]'
	$(BIN)/python -m bench.service.intake_profile

# bench/results/service.json (crash_*): 20 SIGKILL crash runs
bench-service-crash: $(STAMP)
	$(BIN)/python -m bench.service.crash

# bench/results/service.json (fuzz_*): >= 100,000 fuzz cases against the control plane (default bound 1800 s)
bench-service-fuzz: $(STAMP)
	$(BIN)/python -m bench.service.fuzz --max-seconds $(or $(FUZZ_SECONDS),1800)

# bench/results/signals.json: L1/L2 on CPU recordings (issue 3)
signals: $(STAMP)
	$(BIN)/python -m bench.signals.recordings

# bench/results/calibration.json (and src/maxwell_poi/data/thresholds.json): L4 tolerances
calibrate: $(STAMP)
	$(BIN)/python -m bench.audit.calibrate

# bench/results/reliability.json: L4 error rates with confidence bounds on the trained model (issue 10)
reliability: $(STAMP)
	$(BIN)/python -m bench.audit.reliability

# bench/results/peers.json and peers.md: TOPLOC, logprob-rank, DiFR and L4 side by side
peers: $(STAMP)
	$(BIN)/python -c "import toploc" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt \
		--no-build-isolation --no-binary toploc toploc==0.1.6 || echo "TOPLOC not built; bench/peers/compare.py skips it"
	$(BIN)/python -m bench.peers.compare

# bench/results/gateway.json (audit_throughput): audits/s of the process pool and Ray actors, 1 and 2 workers
audit-throughput: $(STAMP)
	$(BIN)/python -m bench.service.audit_throughput

# bench/results/detection_floor.json: the smallest deliberate change L4 catches
detection-floor: $(STAMP)
	$(BIN)/python -m bench.audit.detection_floor

# bench/results/speculative.json: honest speculative decoding and cheap-draft decoding
speculative: $(STAMP)
	$(BIN)/python -m bench.audit.speculative

# bench/results/classifier.json: L1's workload classifier, 4 rounds of resident recordings on two models (~12 min)
classifier: $(STAMP)
	$(BIN)/python -m bench.signals.classifier

# bench/results/gateway.json (gateway_*, detection_latency_tokens, honest_cut): the OpenAI gateway end to end (~8 min);
# the in-process streaming keys: python -m bench.service.streaming
gateway: $(STAMP)
	$(BIN)/python -m bench.service.gateway

# bench/results/exact.json: L3 exact audits and disputes (trace cost, Freivalds vs recompute, ~1B shapes; ~4 min);
# then integrity.json one_block_cheat_caught_per_challenged_lease, exact_all_blocks_vs_generation (~6 min)
exact: $(STAMP)
	$(BIN)/python -m bench.exact.audits
	$(BIN)/python -m bench.exact.every_block

# bench/results/exact_service.json: the exact tier through a control plane and node on loopback (~5 min)
exact-service: $(STAMP)
	$(BIN)/python -m bench.exact.service

# bench/results/zk.json: EZKL proofs of one block half per width and per setting (~40 min)
zk: $(STAMP)
	$(BIN)/python -m bench.zk.ezkl

# bench/results/bf16_int8.json: can a bf16 claim exclude int8-rounded weights?
bf16-int8: $(STAMP)
	$(BIN)/python -m bench.audit.bf16_int8

# bench/results/trained_model.json: retrains poi-lm and poi-lm-draft (~22 min on 2 cores); update the registry's digests
train-model: $(STAMP)
	$(BIN)/python -m bench.audit.train_model

# issue 14: the research report from bench/results/*.json -> docs/report/build/report.{html,pdf}
report: $(STAMP)
	$(BIN)/python -m maxwell_poi.report.build

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) poi-demo .pytest_cache
