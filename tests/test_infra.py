"""infra/ validates offline: Kubernetes manifests, KubeRay custom resources, the compose file, the Airflow Helm
values and the gpu profile's DeepSpeed configs, each against the schema or parser of the tool that will read it."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipelines.config import load_profile, load_stage_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
COMPOSE = INFRA / "compose" / "docker-compose.yaml"
# The oldest Kubernetes minor that current KubeRay releases support, and the newest schemas the validator ships.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())


def _render_module():
    spec = importlib.util.spec_from_file_location("kuberay_render", KUBERAY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def render():
    return _render_module()


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((KUBERAY / "values.yaml").read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((KUBERAY / "kuberay-v1-subset.schema.json").read_text())


def _k8s_validate(doc: dict, what: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(map(str, err.absolute_path))
            pytest.fail(f"{what} is not a valid {doc.get('kind')} for Kubernetes {version}: {where}: {err.message}")


def _pod_templates(cr: dict) -> list[tuple[str, dict]]:
    spec = cr["spec"]["rayClusterSpec"] if cr["kind"] == "RayJob" else cr["spec"]
    if spec is None:
        return []
    out = [("headGroupSpec", spec["headGroupSpec"]["template"])]
    out += [(f"workerGroupSpecs[{g['groupName']}]", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def _validate_ray_cr(cr: dict, schema: dict, what: str) -> None:
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(cr), key=lambda e: e.path)
    if errors:
        pytest.fail(f"{what}: " + "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors))
    if cr["kind"] == "RayJob" and "rayClusterSpec" not in cr["spec"]:
        return
    for where, template in _pod_templates(cr):
        # KubeRay embeds a core/v1 PodTemplateSpec; wrapping it as a PodTemplate lets Kubernetes' schema judge it.
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        _k8s_validate(wrapped, f"{what} {where}.template")


# ------------------------------------------------------------------------------------------------ KubeRay


def test_committed_manifests_are_the_rendered_values(render, values):
    rendered = render.render(values)
    on_disk = {p.name for p in (KUBERAY / "rendered").glob("*.yaml")}
    assert on_disk == set(rendered), "infra/kuberay/rendered/ is stale: run .venv/bin/python infra/kuberay/render.py"
    for name, doc in rendered.items():
        assert (KUBERAY / "rendered" / name).read_text() == render.dump(doc, "values.yaml"), (
            f"infra/kuberay/rendered/{name} differs from values.yaml: run .venv/bin/python infra/kuberay/render.py")


def test_every_manifest_validates_against_kubernetes_and_kuberay_schemas(ray_schema):
    kinds = []
    for path in sorted((KUBERAY / "rendered").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.append(doc["kind"])
            if doc["apiVersion"] == "ray.io/v1":
                _validate_ray_cr(doc, ray_schema, path.name)
            else:
                _k8s_validate(doc, path.name)
    assert sorted(kinds) == ["NetworkPolicy", "PersistentVolumeClaim", "RayCluster", "RayJob"]


def test_rayjob_with_its_own_cluster_validates(render, values, ray_schema):
    own = copy.deepcopy(values)
    own["job"]["cluster"] = "own"
    job = render.rayjob(own)
    assert job["spec"]["rayClusterSpec"] == render.cluster_spec(values)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _validate_ray_cr(job, ray_schema, "RayJob with rayClusterSpec")


def test_validators_reject_broken_manifests(render, values, ray_schema):
    cluster = render.raycluster(values)
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")
    with pytest.raises(pytest.fail.Exception, match="workerGroupSpec"):
        _validate_ray_cr(typo, ray_schema, "typo")
    numeric_param = copy.deepcopy(cluster)
    numeric_param["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = 8  # KubeRay wants strings
    with pytest.raises(pytest.fail.Exception, match="num-gpus"):
        _validate_ray_cr(numeric_param, ray_schema, "int param")
    bad_pod = copy.deepcopy(cluster)
    bad_pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(pytest.fail.Exception, match="volumeMount"):
        _validate_ray_cr(bad_pod, ray_schema, "pod typo")
    pvc = render.storage(values)
    pvc["spec"]["accessModes"] = "ReadWriteMany"
    with pytest.raises(pytest.fail.Exception, match="PersistentVolumeClaim"):
        _k8s_validate(pvc, "pvc")


def test_cluster_fits_the_gpu_profile(render, values):
    """The GPU worker group can place the gpu profile's Ray Train workers and sampling actors."""
    from pipelines.relevance.config import SFTConfig
    from pipelines.relevance.stages import TAOSR1

    sft = load_stage_config(SFTConfig, "taosr1", "sft", "gpu")
    sample = load_profile("gpu")["taosr1"]["sample"]
    gpu = values["gpu_workers"]
    total_gpus = gpu["gpus_per_pod"] * gpu["max_replicas"]
    assert sft.use_gpu and sft.num_workers <= total_gpus
    assert sample["num_actors"] <= total_gpus
    # Ray Train asks {"CPU": cpus_per_worker, "GPU": 1} per worker; a pod must hold its share of workers.
    workers_per_pod = min(sft.num_workers, gpu["gpus_per_pod"])
    assert float(gpu["cpu"]) >= workers_per_pod * sft.cpus_per_worker
    group = render.raycluster(values)["spec"]["workerGroupSpecs"][1]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"][gpu["gpu_resource"]] == gpu["gpus_per_pod"]
    assert {"name": "DS_ACCELERATOR", "value": "cuda"} in container["env"]
    # The RayJob runs a real stage of a real profile, as `searchrel run` parses it.
    argv = shlex.split(render.rayjob(values)["spec"]["entrypoint"])
    assert argv[:3] == ["searchrel", "run", "taosr1"]
    assert argv[argv.index("--stages") + 1] in TAOSR1.names
    load_profile(argv[argv.index("--profile") + 1])


def test_every_ray_pod_mounts_the_shared_artifact_root(render, values):
    cluster = render.raycluster(values)
    root = values["storage"]["artifact_root"]
    assert root.startswith(values["storage"]["mount_path"] + "/")
    for where, template in _pod_templates(cluster):
        spec = template["spec"]
        container = spec["containers"][0]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert claims == {"artifacts": values["storage"]["claim_name"]}, where
        assert mounts["artifacts"] == values["storage"]["mount_path"], where
        assert {"name": "SEARCHREL_ROOT", "value": root} in container["env"], where
        assert {"secretRef": {"name": values["mlflow_secret"]}} in container["envFrom"], where
    assert render.storage(values)["spec"]["accessModes"] == ["ReadWriteMany"]


# ------------------------------------------------------------------------------------------------ compose

_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":-", ":?") and not value or op in ("-", "?") and value is None or op is None and value is None:
            if op and op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg or ""
        return value

    return _VAR.sub(sub, text)


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _interpolate_doc(node, env: dict[str, str]):
    """Compose substitutes variables in the parsed values (not in comments)."""
    if isinstance(node, dict):
        return {k: _interpolate_doc(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_doc(v, env) for v in node]
    return _interpolate(node, env) if isinstance(node, str) else node


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (INFRA / "compose" / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    # check-jsonschema (PyPI) vendors compose-spec's schema (Apache-2.0) with its licence and checksum.
    return json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def _compose_errors(doc: dict, schema: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]


def test_compose_file_validates_before_and_after_interpolation(compose_schema):
    raw = COMPOSE.read_text()
    assert _compose_errors(yaml.safe_load(raw), compose_schema) == []
    resolved = _interpolate_doc(yaml.safe_load(raw), _env_example())
    assert _compose_errors(resolved, compose_schema) == []
    services = resolved["services"]
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                 "airflow-db", "mlflow", "mlflow-db", "minio", "ray-head", "ray-worker"):
        assert name in services, f"compose service {name} is missing"
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert "--app-name basic-auth" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert "s3://" in services["mlflow"]["command"]
    broken = yaml.safe_load(raw)
    broken["services"]["mlflow"]["enviroment"] = {}
    assert any("enviroment" in e for e in _compose_errors(broken, compose_schema))


def test_compose_secrets_come_only_from_the_environment():
    doc = yaml.safe_load(COMPOSE.read_text())
    example = _env_example()
    required = {m.group("name") for text in _strings(doc) for m in _VAR.finditer(text) if m.group("op") in (":?", "?")}
    assert required, "no ${VAR:?...} secrets found"
    assert required <= set(example), f".env.example lacks {sorted(required - set(example))}"
    for name in required:
        assert re.search(r"change-me|placeholder", example[name]) or name.endswith("_USER"), (
            f".env.example: {name} must hold a placeholder, not a real value")
    with pytest.raises(KeyError, match="AIRFLOW_DB_PASSWORD"):
        _interpolate_doc(doc, {k: v for k, v in example.items() if k != "AIRFLOW_DB_PASSWORD"})
    secretish = re.compile(r"PASSWORD|SECRET|FERNET|SECRET_KEY|ACCESS_KEY")
    for name, service in doc["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key) and not key.endswith("_FILE"):  # a path to a secret is not one
                assert "${" in str(value), f"compose service {name}: {key} is a literal, not from the environment"


def test_compose_ports_are_published_on_loopback_only():
    doc = yaml.safe_load(COMPOSE.read_text())
    published = {}
    for name, service in doc["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond loopback"
            published[name] = port
    assert set(published) == {"airflow-apiserver", "mlflow", "minio", "ray-head"}
    assert published["ray-head"].endswith(":8265")


# ------------------------------------------------------------------------------------------------ Helm


def test_airflow_helm_values_reference_secrets_and_the_ray_head(values):
    doc = yaml.safe_load((INFRA / "helm" / "airflow-values.yaml").read_text())
    assert doc["executor"] in {"LocalExecutor", "CeleryExecutor", "KubernetesExecutor"}
    assert doc["postgresql"]["enabled"] is False and doc["data"]["metadataSecretName"]
    for key in ("fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName"):
        assert doc[key], key
    for literal in ("fernetKey", "apiSecretKey", "jwtSecret", "webserverSecretKey"):
        assert not doc.get(literal), f"airflow-values.yaml sets {literal} literally; use {literal}SecretName"
    assert "metadataConnection" not in doc["data"]
    sync = doc["dags"]["gitSync"]
    assert sync["enabled"] and (REPO / sync["subPath"]).is_dir()
    env_from_secrets = {s["envName"] for s in doc["secret"]}
    assert {"AIRFLOW_CONN_RAY_DEFAULT", "MLFLOW_TRACKING_URI"} <= env_from_secrets
    # The documented ray_default address is the KubeRay head Service's Jobs API.
    head_svc = f"{values['cluster_name']}-head-svc.{values['namespace']}.svc.cluster.local:8265"
    assert head_svc in (INFRA / "helm" / "airflow-values.yaml").read_text()
    assert head_svc in (INFRA / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ DeepSpeed


def _subset(small, big, where="") -> list[str]:
    if isinstance(small, dict):
        return [p for k, v in small.items()
                for p in (_subset(v, big[k], f"{where}.{k}") if isinstance(big, dict) and k in big
                          else [f"{where}.{k} missing"])]
    return [] if small == big else [f"{where}: {small!r} (from the profile) != {big!r} (in the file)"]


@pytest.mark.parametrize("stage,name", [(3, "zero3.json"), (2, "zero2.json")])
def test_deepspeed_files_agree_with_the_gpu_profile(stage, name):
    """What sft.deepspeed_config builds from the gpu profile at its world size is in the file, unchanged."""
    from pipelines.relevance.config import SFTConfig
    from pipelines.training.runtime import deepspeed_config

    sft = load_stage_config(SFTConfig, "taosr1", "sft", "gpu",
                            [f"sft.zero_stage={stage}", f"sft.deepspeed_config=infra/deepspeed/{name}"])
    assert sft.dtype == "bfloat16" and sft.num_workers == 8
    file = json.loads((INFRA / "deepspeed" / name).read_text())
    built = deepspeed_config(sft, sft.num_workers)
    assert _subset(built, file) == []
    assert built["zero_optimization"] == file["zero_optimization"]  # the file's tuning knobs reach the engine


def test_a_deepspeed_file_that_contradicts_the_profile_is_refused():
    from pipelines.relevance.config import SFTConfig
    from pipelines.training.runtime import deepspeed_config

    sft = load_stage_config(SFTConfig, "taosr1", "sft", "gpu", ["sft.zero_stage=2"])  # file says ZeRO-3
    with pytest.raises(ValueError, match=r"zero3.json disagrees .*zero_optimization.stage: file 3 vs config 2"):
        deepspeed_config(sft, sft.num_workers)
    with pytest.raises(ValueError, match=r"train_batch_size: file 256 vs config 128"):
        deepspeed_config(load_stage_config(SFTConfig, "taosr1", "sft", "gpu", []), 4)


@pytest.mark.slow  # two DeepSpeed processes, about 30 s on 2 cores
def test_deepspeed_accepts_the_configs_for_8_gpus_and_rejects_broken_ones(tmp_path):
    typo = json.loads((INFRA / "deepspeed" / "zero3.json").read_text())
    typo["zero_optimization"]["overlap_com"] = True
    (tmp_path / "typo.json").write_text(json.dumps(typo))
    env = os.environ | {"DS_ACCELERATOR": "cpu", "MASTER_PORT": "29561"}
    script = str(INFRA / "deepspeed" / "validate.py")

    ok = subprocess.run([sys.executable, script, str(INFRA / "deepspeed" / "zero2.json"),
                         str(INFRA / "deepspeed" / "zero3.json"), "--world-size", "8"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    parsed = [json.loads(line) for line in ok.stdout.splitlines() if line.startswith("{")]
    assert [(p["zero_stage"], p["world_size"], p["bf16"]) for p in parsed] == [(2, 8, True), (3, 8, True)]
    assert all(p["train_batch_size"] == p["micro_batch_per_gpu"] * p["gradient_accumulation_steps"] * 8
               for p in parsed)

    bad = subprocess.run([sys.executable, script, str(tmp_path / "typo.json"),
                          str(INFRA / "deepspeed" / "zero3.json"), "--world-size", "4"],
                         capture_output=True, text=True, env=env | {"MASTER_PORT": "29562"}, timeout=300)
    assert bad.returncode == 1
    assert "typo.json" in bad.stderr and "overlap_com" in bad.stderr
    assert "256 != 16 * 2 * 4" in bad.stderr  # zero3.json is for 8 GPUs, not 4
