# Thin wrappers; every target is idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: setup serve test clean

setup: $(STAMP)

# torch first: on machines without CUDA the pinned CPU build comes from the local wheel,
# and the project's range then installs no other torch.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

serve: setup
	$(BIN)/bucketserve serve

test: setup
	$(BIN)/python -m pytest -v --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
