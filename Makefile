# The two commands of the README: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STORE ?= file://$(CURDIR)/.semisup/store
# the demo retrains every time it is asked to, even when no new images arrived since the last champion
CONF ?= {"min_new_images": 0}
export SEMISUP_STORE := $(STORE)

.PHONY: venv demo test lint clean-demo experiments

# pins live in pyproject.toml (torch/torchvision install from this machine's disk; Airflow from PyPI)
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[airflow,demo,test]'
	touch $@

venv: $(VENV)/.installed

# demo data -> semisup_retrain through Airflow (dags test on SQLite) -> the report table
demo: venv
	$(VENV)/bin/semisup demo-data --store $(STORE)
	source scripts/airflow_env.sh && $(VENV)/bin/airflow db migrate > /dev/null && \
	  $(VENV)/bin/airflow dags test semisup_retrain -c '$(CONF)' > .airflow/demo.log 2>&1 \
	  || { tail -50 .airflow/demo.log; echo "make demo: the DAG run failed; full log in .airflow/demo.log"; exit 1; }
	$(VENV)/bin/semisup report --store $(STORE) --run latest

# the experiments grid on the demo data (about an hour on 2 CPU cores), exported to reproduction/$(GRID)/;
# the same experiment id again resumes it. GRID=ci for a few minutes, GRID=full for GPUs,
# GRID=noisy_student for soft labels and mixed batches. The notes (why a finding does not agree) were
# written for a grid's committed numbers: reproduction/$(GRID)/notes.json, where there is one.
GRID ?= default
experiments: venv
	$(VENV)/bin/semisup demo-data --store $(STORE)
	$(VENV)/bin/semisup experiments run --store $(STORE) --experiment demo-$(GRID) --grid $(GRID) \
	  $(if $(wildcard reproduction/$(GRID)/notes.json),--notes reproduction/$(GRID)/notes.json) --to reproduction/$(GRID)

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check semisup_tasks plugins dags tests benchmarks

clean-demo:
	rm -rf .semisup .airflow
