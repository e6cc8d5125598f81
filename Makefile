# Two commands on a fresh machine:  make demo  |  make test
# Each creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test bench bench-control bench-prune bench-churn compat install clean

$(VENV)/.installed-dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed-dev

test: $(VENV)/.installed-dev
	$(PY) -m pytest

demo: $(VENV)/.installed-dev
	$(PY) examples/demo.py

bench: $(VENV)/.installed-dev
	$(PY) -m pip install -q -e '.[bench]'
	bash bench/services.sh
	$(PY) bench/run.py

# Remote-control cost: inspect ping vs Redis/RabbitMQ, and table sizes under 4 idle
# workers for 10 minutes (MINUTES=… to change).
MINUTES ?= 10
bench-control: $(VENV)/.installed-dev
	$(PY) -m pip install -q -e '.[bench]'
	bash bench/services.sh
	$(PY) bench/control.py --minutes $(MINUTES)

# Pruning 1M finished jobs while producing and consuming (ROWS=… to change).
ROWS ?= 1000000
bench-prune: $(VENV)/.installed-dev
	bash bench/services.sh
	$(PY) bench/prune.py --rows $(ROWS)

# Claim latency over minutes of publish/claim/complete beside 1M finished jobs.
bench-churn: $(VENV)/.installed-dev
	bash bench/services.sh
	$(PY) bench/churn.py --rows $(ROWS)

# Celery's own integration suite against pgbroker (brings up PostgreSQL with the test
# role and database, as the benchmark does; see README).
compat: $(VENV)/.installed-dev
	bash bench/services.sh
	$(PY) compat/run_celery_suite.py

clean:
	rm -rf $(VENV) .pytest_cache
