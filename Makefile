# Open Model Pipeline — the two commands a newcomer needs are `make repro` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/tiny.yaml
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test test-slow test-fast soak bench clean

setup: $(STAMP)

# A locked install (hashes for everything; regenerate with `python3.11 tools/lock_env.py`):
# torch first (the local CPU wheel) with setuptools, then every other package from requirements.lock,
# then the project itself, editable, without deps. --no-deps throughout: pip resolves nothing.
$(STAMP): requirements-torch.lock requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements-torch.lock
	$(BIN)/pip install --quiet --require-hashes --no-deps --no-build-isolation -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m "not slow"

# the heavy multi-process runs `make test` leaves out (two-node launch, islands, a late torchft replica, DeepSpeed divergence)
test-slow: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m slow

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not e2e"

# every multi-process test 20 times, idle and then beside a CPU hog (hours on 2 cores; not in `make test`)
soak: $(STAMP)
	$(BIN)/python tests/soak.py --runs $(or $(RUNS),20)
	$(BIN)/python tests/soak.py --runs $(or $(RUNS),20) --hog

bench: $(STAMP)
	$(BIN)/python bench/blend.py
	$(BIN)/python bench/tokenize_throughput.py

clean:
	rm -rf artifacts
