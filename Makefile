# The two commands people and CI share: `make demo` and `make test`. Both set up .venv first.
# `make airflow` (optional): the same DAGs in a real local Airflow 3 with its UI; Ctrl-C stops it.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo airflow test test-quick bench lock

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[airflow,test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	./scripts/demo

airflow: setup
	$(PY) scripts/airflow

test: setup
	./scripts/install-test-deps
	$(PY) -m pytest

test-quick: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) benchmarks/bench_index.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_parse.py

# Re-resolve the training image's dependencies from pyproject.toml (images/lock.py); CI checks
# that the lock files still match pyproject.toml (tests/test_deploy.py).
lock: setup
	$(PY) images/lock.py
