# Open Model Pipeline — the two commands a newcomer needs are `make repro` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/tiny.yaml
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test test-slow test-fast soak bench clean

setup: $(STAMP)

# torch first, pinned (a CPU wheel); then the project, editable, with its dev extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
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
