"""searchrel as an Airflow provider: what `airflow providers list` shows and what the connection form offers.

setup.cfg registers `get_provider_info` under the `apache_airflow_provider` entry point; Airflow reads it
without importing the hook, so this module imports nothing of Airflow or Ray. The Ray connection's form is
declared here (`conn-fields`, `ui-field-behaviour`: Airflow >= 3.2 reads them from the provider info and no longer
calls the hook's methods); `RayHook.get_ui_field_behaviour` returns the same behaviour for older Airflow.

The connection type is `ray`, as in astronomer's Ray provider, and an astronomer-style connection
(`{"conn_type": "ray", "extra": {"address": "http://HEAD:8265"}}`) works unchanged: see `operators.hooks.ray`.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

PACKAGE_NAME = "searchrel"  # the distribution's name (setup.cfg): Airflow refuses a provider whose names differ
INTEGRATION = "Ray (searchrel)"
RAY_HOOK_CLASS = "operators.hooks.ray.RayHook"

# Extra fields the connection form shows above the raw `extra` JSON (which still holds `runtime_env`).
RAY_CONN_FIELDS: dict[str, dict[str, Any]] = {
    "address": {"label": "Ray address",
                "description": "The Ray head's Jobs API, e.g. http://10.0.0.5:8265 (astronomer's Ray provider keeps "
                               "it here). Set this or Host, not both; Host `local` runs jobs as local subprocesses.",
                "schema": {"type": ["string", "null"]}},
    "python": {"label": "Python on the cluster",
               "description": "The interpreter that has searchrel installed on the Ray nodes (default: python).",
               "schema": {"type": ["string", "null"]}},
    "entrypoint_num_cpus": {"label": "Entrypoint CPUs",
                            "description": "CPUs each stage's driver reserves on the cluster (default: Ray's).",
                            "schema": {"type": ["number", "null"]}},
    "env_passthrough": {"label": "Environment pass-through",
                        "description": "More worker variables to pass to jobs, comma-separated, PREFIX* allowed "
                                       "(never an AIRFLOW* one).",
                        "schema": {"type": ["string", "null"]}},
    "jobs_dir": {"label": "Local jobs folder",
                 "description": "Host `local` only: where job folders go (default $AIRFLOW_HOME/ray_jobs).",
                 "schema": {"type": ["string", "null"]}},
}
RAY_UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema", "login", "password"],
    "relabeling": {"host": "Host (or local)", "port": "Jobs API port"},
    "placeholders": {"host": "local, or the Ray head (leave empty when Ray address is set)",
                     "port": "8265",
                     "extra": '{"runtime_env": {"pip": ["..."]}}'},
}


def _version() -> str:
    try:
        return metadata.version(PACKAGE_NAME)
    except metadata.PackageNotFoundError:  # imported from a checkout that was never installed
        return "0.0.0"


def get_provider_info() -> dict[str, Any]:
    """The provider's description in the format of Airflow's `provider_info.schema.json`."""
    return {
        "package-name": PACKAGE_NAME,
        "name": "searchrel",
        "description": "Run searchrel's pipeline stages (TaoSR1 relevance, AutoFAS pre-ranking) as Ray jobs: "
                       "a Ray connection type, RayHook, RayJobOperator, PromotionOperator and RayJobTrigger.",
        "versions": [_version()],
        "integrations": [{"integration-name": INTEGRATION, "external-doc-url": "https://docs.ray.io/en/latest/"
                          "cluster/running-applications/job-submission/index.html", "tags": ["software"]}],
        "connection-types": [{"connection-type": "ray", "hook-class-name": RAY_HOOK_CLASS, "hook-name": "Ray",
                              "conn-fields": RAY_CONN_FIELDS, "ui-field-behaviour": RAY_UI_FIELD_BEHAVIOUR}],
        "hooks": [{"integration-name": INTEGRATION, "python-modules": ["operators.hooks.ray"]}],
        "operators": [{"integration-name": INTEGRATION,
                       "python-modules": ["operators.operators.ray_job", "operators.operators.promotion"]}],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": ["operators.triggers.ray"]}],
    }
