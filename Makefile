# The two commands a new user needs: `make demo` (the main job end to end) and `make test`.
# Both create or reuse .venv; it is reinstalled only when a requirements file or the packaging changes.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ROOT ?= $(CURDIR)/artifacts
RUN_KEY ?= demo
PROFILE ?= tiny
DATA ?= $(abspath $(CURDIR)/../shared/data)
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check

# Embedded default: every side effect stays inside the work tree, nothing phones home.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S := 0.2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/hf_home
export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR := cpu
export SEARCHREL_ROOT := $(ROOT)

.PHONY: venv demo test test-fast lint bench ui clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-torch.txt requirements-nodeps.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -U pip==26.3 2> >(grep -v 'is ignored' >&2)
	$(PIP) -r requirements-torch.txt 2> >(grep -v 'is ignored' >&2)
	$(PIP) -r requirements.txt 2> >(grep -v 'is ignored' >&2)
	$(PIP) --no-deps -r requirements-nodeps.txt 2> >(grep -v 'is ignored' >&2)
	$(PIP) --no-deps --no-build-isolation -e . 2> >(grep -v 'is ignored' >&2)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/searchrel prepare --dataset crowdflower --path $(DATA)/crowdflower_search_relevance --run-key $(RUN_KEY) --profile $(PROFILE)
	$(VENV)/bin/searchrel prepare --dataset movielens --path $(DATA)/movielens_100k_recbole --run-key $(RUN_KEY) --profile $(PROFILE)
	@echo "Results under $(ROOT). Open the MLflow UI with: $(VENV)/bin/searchrel ui"

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) bench/prepare.py

ui: $(STAMP)
	$(VENV)/bin/searchrel ui

clean:
	rm -rf $(ROOT) .airflow .cache
