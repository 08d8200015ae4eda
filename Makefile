# Quick start: `make demo` (set up + pre-train on the bundled data + kNN/linear probe vs random init + the run's report) and `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sslctl-installed
BASE_STAMP := $(VENV)/.sslctl-base-installed

.PHONY: setup setup-base demo test test-fast lint bench clean

setup: $(STAMP)
setup-base: $(BASE_STAMP)

# torch first, pinned to the build this project is tested with (served locally on our machines);
# then the package with the plot extra (matplotlib: the demo ends with `sslctl report`'s picture).
# Tests add the dev tools, TensorBoard and the DALI extra (about 0.5 GB, for the DALI reader
# tests), which the demo never uses.
$(BASE_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[plot]'
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e '.[dev,dali,plot,tensorboard]'
	touch $(STAMP)

# Pre-train on the bundled data, then kNN + a linear probe of the learned backbone next to a
# randomly initialised one (cached-feature protocol), then the run's report (curves, tables; it
# prints where report.png is). Rerunning continues / reuses both runs.
demo: setup-base
	$(VENV)/bin/sslctl pretrain --profile demo-cpu --out runs/demo
	$(VENV)/bin/sslctl linear-eval runs/demo --data bundled --protocol cached --compare-random --out runs/demo-eval
	$(VENV)/bin/sslctl report runs/demo --eval runs/demo-eval

test: setup
	$(VENV)/bin/ruff check sslctl tests benchmarks
	$(VENV)/bin/mypy sslctl
	$(VENV)/bin/pytest -q

# The tests under ~10 s each (no torchrun, no CLI pre-training in a subprocess): a quick check
# while editing. `make test` (all of them) is what CI runs; markers: tests/conftest.py.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow and not ddp"

lint: setup
	$(VENV)/bin/ruff check sslctl tests benchmarks
	$(VENV)/bin/ruff format --check sslctl tests benchmarks
	$(VENV)/bin/mypy sslctl

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
