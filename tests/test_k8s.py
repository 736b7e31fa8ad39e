"""k8s/: every overlay renders, every object is what the API server and KubeRay would accept, and
everything the manifests name (code, Secrets, versions) exists. No cluster: see cluster/validate.py."""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from cluster.kustomize import KustomizeError, build
from cluster.validate import errors, serve_config_errors, strict_schema

REPO = Path(__file__).resolve().parent.parent
OVERLAYS = ["cpu", "gpu"]
"""The stack (k8s/base); `<overlay>-tune` is the tune RayJob (k8s/tune), applied on its own."""
SECRETS = REPO / "k8s" / "secrets.example.yaml"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")


@pytest.fixture(scope="module")
def rendered_all() -> dict[str, list[dict]]:
    """Every overlay folder rendered: the stacks and the tune jobs."""
    return {name: build(REPO / "k8s" / "overlays" / name) for o in OVERLAYS for name in (o, f"{o}-tune")}


@pytest.fixture(scope="module")
def rendered(rendered_all) -> dict[str, list[dict]]:
    """The stacks alone: what `kubectl apply -k k8s/overlays/<overlay>` creates."""
    return {name: rendered_all[name] for name in OVERLAYS}


@pytest.fixture(scope="module")
def everything(rendered_all) -> dict[str, list[dict]]:
    """Per overlay, the stack and its tune job: all the objects that run on one cluster."""
    return {name: rendered_all[name] + rendered_all[f"{name}-tune"] for name in OVERLAYS}


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _cluster_specs(objects: list[dict]) -> list[dict]:
    """The RayCluster spec of each Ray object: its own, a RayJob's, a RayService's."""
    return ([o["spec"] for o in _by_kind(objects, "RayCluster")]
            + [o["spec"]["rayClusterSpec"] for o in _by_kind(objects, "RayJob")]
            + [o["spec"]["rayClusterConfig"] for o in _by_kind(objects, "RayService")])


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# ---------------------------------------------------------------- rendering and schemas


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its kustomize) is not installed")
@pytest.mark.parametrize("overlay", [name for o in OVERLAYS for name in (o, f"{o}-tune")])
def test_the_python_renderer_agrees_with_kubectl_kustomize(overlay: str, rendered_all) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(rendered_all[overlay], key=key) == sorted(yaml.safe_load_all(out), key=key)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_crds_and_kubernetes(overlay: str, rendered_all) -> None:
    stack, tune = rendered_all[overlay], rendered_all[f"{overlay}-tune"]
    assert sorted(o["kind"] for o in stack) == ["ConfigMap", "RayCluster", "RayJob", "RayService", "ServiceAccount"]
    assert [(o["kind"], o["metadata"]["name"]) for o in tune] == [("RayJob", "peftu-tune")]
    assert {e for o in stack + tune for e in errors(o)} == set()


def test_the_secret_template_is_valid_and_holds_no_key() -> None:
    secrets = list(yaml.safe_load_all(SECRETS.read_text()))
    assert {s["metadata"]["name"] for s in secrets} == {"peftu-s3", "peftu-ray-auth", "peftu-serve"}
    assert {e for s in secrets for e in errors(s)} == set()
    assert all(v.startswith("REPLACE_WITH_") for s in secrets for v in s["stringData"].values())


def test_the_validator_rejects_what_the_api_server_would(rendered) -> None:
    """Unknown fields (pruned or refused by Kubernetes), wrong types, bad quantities, out-of-range ints."""
    cluster = copy.deepcopy(_by_kind(rendered["gpu"], "RayCluster")[0])
    assert errors(cluster) == []
    head, worker = cluster["spec"]["headGroupSpec"], cluster["spec"]["workerGroupSpecs"][0]
    head["rayStartParms"] = {"num-cpus": "0"}
    head["template"]["spec"]["containers"][0]["envv"] = []
    worker["replicas"] = "1"
    worker["maxReplicas"] = 2**40
    worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "4 cores"
    cluster["metadata"]["lables"] = {"a": "b"}
    cluster["spec"]["authOptions"]["mode"] = "password"
    found = "\n".join(errors(cluster))
    for expected in ["spec.headGroupSpec: Additional properties are not allowed ('rayStartParms'",
                     "containers.0: Additional properties are not allowed ('envv'",
                     "workerGroupSpecs.0.replicas: '1' is not of type 'integer'",
                     "workerGroupSpecs.0.maxReplicas: 1099511627776 is not a 'int32'",
                     "limits.cpu: '4 cores' does not match",
                     "metadata: Additional properties are not allowed ('lables'",
                     "spec.authOptions.mode: 'password' is not one of"]:
        assert expected in found
    assert len(errors(cluster)) == 7

    # int-or-string quantities take both; a field with CEL rules is reported, not passed unchecked.
    ok = copy.deepcopy(_by_kind(rendered["cpu"], "RayCluster")[0])
    ok["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 4
    assert errors(ok) == []
    ok["spec"]["managedBy"] = "ray.io/kuberay-operator"
    assert [e for e in errors(ok) if "CEL rules" in e]

    config_map = copy.deepcopy(_by_kind(rendered["cpu"], "ConfigMap")[0])
    config_map["dataa"] = {}
    assert errors(config_map) and "dataa" in errors(config_map)[0]


def test_strict_schema_closes_objects_but_not_maps() -> None:
    schema = strict_schema({"type": "object", "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "empty": {"type": "object"},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "list": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}}}})
    assert schema["additionalProperties"] is False
    assert schema["properties"]["labels"]["additionalProperties"] == {"type": "string"}
    assert schema["properties"]["empty"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["open"]
    assert schema["properties"]["list"]["items"]["additionalProperties"] is False


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: dev-\n")
    with pytest.raises(KustomizeError, match="unsupported fields \\['namePrefix'\\]"):
        build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(KustomizeError, match="'missing.yaml' does not exist"):
        build(tmp_path)


# ---------------------------------------------------------------- what the manifests promise


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_clusters_head_autoscaling_auth_and_resources(overlay: str, everything) -> None:
    specs = _cluster_specs(everything[overlay])
    assert len(specs) == 4  # the RayCluster, the fit and tune RayJobs, the RayService
    for spec in specs:
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"] == {"mode": "token", "secretName": "peftu-ray-auth"}
        for container in _containers(spec):
            assert set(container["resources"]) == {"requests", "limits"}
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            assert gpus == ("1" if overlay == "gpu" else None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_and_config_map_reference_exists(overlay: str, rendered, everything) -> None:
    """Also the tune job's: it runs on the stack's ServiceAccount, ConfigMap and Secrets."""
    serve = _by_kind(rendered[overlay], "RayService")[0]["spec"]["rayClusterConfig"]
    serve_env = {e["name"] for c in _containers(serve) for e in c["env"]}
    assert {"PEFTU_ADMIN_KEY", "PEFTU_TOKEN_SECRET"} <= serve_env  # the serving app's secrets
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in yaml.safe_load_all(SECRETS.read_text())}
    config_maps = {c["metadata"]["name"] for c in _by_kind(rendered[overlay], "ConfigMap")}
    accounts = {a["metadata"]["name"] for a in _by_kind(rendered[overlay], "ServiceAccount")}
    for spec in _cluster_specs(everything[overlay]):
        assert spec["authOptions"]["secretName"] in secrets and "auth_token" in secrets["peftu-ray-auth"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert {g["template"]["spec"]["serviceAccountName"] for g in groups} <= accounts
        for container in _containers(spec):
            refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                    for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
            assert {("peftu-s3", "AWS_ACCESS_KEY_ID"), ("peftu-s3", "AWS_SECRET_ACCESS_KEY")} <= refs
            assert all(key in secrets[name] for name, key in refs)
            assert {e["configMapRef"]["name"] for e in container["envFrom"]} <= config_maps


def test_ray_version_and_images_are_pinned_like_pyproject(everything) -> None:
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [ray_pin] = [p for p in pins if p.startswith("ray[")]
    minor = re.fullmatch(r"ray\[[a-z,]+\]==(\d+\.\d+)\.\*", ray_pin).group(1)
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    base_image = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.M).group(1)
    torch = re.search(r"^ARG TORCH=(\S+)$", dockerfile, re.M).group(1)
    assert f"torch=={torch}" in (REPO / "Makefile").read_text()
    assert base_image == f"{minor}.0-py311"
    for overlay, objects in everything.items():
        for spec in _cluster_specs(objects):
            assert spec["rayVersion"] == f"{minor}.0"
            assert {c["image"] for c in _containers(spec)} == {f"peftu:0.1.0-ray{minor}.0-py311-{overlay}"}


# ---------------------------------------------------------------- the code the manifests run


def _job_entrypoints(objects: list[dict]) -> list[list[str]]:
    return [shlex.split(job["spec"]["entrypoint"]) for job in _by_kind(objects, "RayJob")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_entrypoints_are_jobs_in_the_repo_and_their_arguments_parse(overlay: str, rendered,
                                                                          everything) -> None:
    """`python -m jobs.X args`: jobs/X.py exists and `peftu X` (what it runs) accepts the arguments.
    Applying the stack starts the fit alone: a search beside it would race it for the workers."""
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    from peftu.cli import build_parser

    assert [module for _, _, module, *_ in _job_entrypoints(rendered[overlay])] == ["jobs.fit"]
    entrypoints = _job_entrypoints(everything[overlay])
    assert sorted(module for _, _, module, *_ in entrypoints) == ["jobs.fit", "jobs.tune"]
    for python, dash_m, module, *args in entrypoints:
        assert (python, dash_m) == ("python", "-m") and module.startswith("jobs.")
        assert (REPO / "jobs" / f"{module.split('.', 1)[1]}.py").is_file()
        command = module.split(".", 1)[1]
        parsed = build_parser().parse_args([command, *args])
        assert parsed.data.startswith("s3://") and parsed.store.startswith("s3://")
        on_gpu = parsed.gpu if command == "fit" else parsed.gpus_per_trial > 0
        assert on_gpu == (overlay == "gpu")
    for job in _by_kind(everything[overlay], "RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        RuntimeEnv(**runtime_env)  # checks the types; unknown keys it only warns about, so:
        assert set(runtime_env) <= RuntimeEnv.known_fields
        assert set(runtime_env.get("config", {})) <= set(RuntimeEnvConfig.known_fields)


@pytest.mark.parametrize(("module", "option"), [("jobs.fit", "--pack-size"), ("jobs.tune", "--trials")])
def test_the_jobs_run_their_help(module: str, option: str) -> None:
    """The modules really run: `python -m jobs.X --help` from the repo root exits 0 and prints the options."""
    done = subprocess.run([sys.executable, "-m", module, "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert option in done.stdout and "--data" in done.stdout


def _serve_configs(rendered) -> dict[str, dict]:
    return {overlay: yaml.safe_load(_by_kind(objects, "RayService")[0]["spec"]["serveConfigV2"])
            for overlay, objects in rendered.items()}


def test_serve_configs_are_valid_and_differ_only_by_the_gpu(rendered) -> None:
    for objects in rendered.values():
        assert serve_config_errors(_by_kind(objects, "RayService")[0]["spec"]["serveConfigV2"]) == []
    configs = _serve_configs(rendered)
    gpu_app = configs["gpu"]["applications"][0]
    assert gpu_app["deployments"][0]["ray_actor_options"].pop("num_gpus") == 1
    assert gpu_app["args"].pop("device") == "cuda"
    assert configs["cpu"]["applications"][0]["args"].pop("device") == "cpu"
    assert configs["gpu"] == configs["cpu"]
    assert serve_config_errors("applications:\n- import_path: serve.app:app\n  deployment: []\n") == \
        ["applications.0.deployment: unknown field of ServeApplicationSchema"]


CLUSTER_SETTINGS = {"num_replicas", "autoscaling_config", "max_ongoing_requests", "ray_actor_options"}
"""What a cluster may set differently from serve/config.yaml, besides the store."""


def _without_cluster_settings(config: dict) -> dict:
    config = copy.deepcopy(config)
    for application in config["applications"]:
        application["args"].pop("store")
        for deployment in application["deployments"]:
            for key in CLUSTER_SETTINGS:
                deployment.pop(key, None)
    return config


def test_serve_config_v2_is_serve_config_yaml_with_the_clusters_store_and_scaling(rendered) -> None:
    """The RayService runs what `serve deploy serve/config.yaml` runs, on the store the fit RayJob fills."""
    from peftu.config import ServeConfig

    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    cluster = _serve_configs(rendered)["cpu"]
    assert _without_cluster_settings(cluster) == _without_cluster_settings(local)
    args = cluster["applications"][0]["args"]
    ServeConfig(**args)  # the app's own check of its args
    [fit] = [job for job in _by_kind(rendered["cpu"], "RayJob") if job["metadata"]["name"] == "peftu-fit"]
    entrypoint = shlex.split(fit["spec"]["entrypoint"])
    assert args["store"] == entrypoint[entrypoint.index("--store") + 1]


def test_import_paths_and_deployment_names_exist_in_the_app(rendered) -> None:
    """Each application's import_path imports, and its deployments are the config's ."""
    from ray.serve import Application
    from ray.serve._private.build_app import build_app

    for config in _serve_configs(rendered).values():
        for application in config["applications"]:
            module, _, attr = application["import_path"].partition(":")
            app = getattr(importlib.import_module(module), attr)
            if not isinstance(app, Application):  # an application builder: Serve calls it with the args
                app = app(application.get("args", {}))
            names = {d.name for d in build_app(app, name=application["name"]).deployments}
            assert {d["name"] for d in application["deployments"]} <= names


# ---------------------------------------------------------------- monitoring (k8s/monitoring)


def test_the_pod_monitor_is_valid_and_scrapes_every_ray_node_on_its_metrics_port() -> None:
    objects = build(REPO / "k8s" / "monitoring")
    assert [(o["apiVersion"], o["kind"]) for o in objects] == [("monitoring.coreos.com/v1", "PodMonitor")]
    assert {e for o in objects for e in errors(o)} == set()
    spec = objects[0]["spec"]
    [node_type] = [e for e in spec["selector"]["matchExpressions"] if e["key"] == "ray.io/node-type"]
    assert node_type["operator"] == "In" and set(node_type["values"]) == {"head", "worker"}
    assert [e["port"] for e in spec["podMetricsEndpoints"]] == ["metrics"]  # KubeRay's name for port 8080
    bad = copy.deepcopy(objects[0])
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in errors(bad))


def _exported_series() -> set[str]:
    """The names Ray's export gives the app's series: ray_<name>, counters with _total, histograms' parts."""
    from peftu.serving.metrics import Metrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {f"ray_{name}{s}" for name, kind in Metrics().names.items() for s in suffixes[kind]}


def test_every_dashboard_panel_queries_series_the_app_exports() -> None:
    dashboard = json.loads((REPO / "k8s" / "monitoring" / "peftu-dashboard.json").read_text())
    exported = _exported_series()
    named: set[str] = set()
    for panel in dashboard["panels"]:
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            series = set(re.findall(r"\bray_peftu_[a-z_]+", expr))
            assert series, f"panel {panel['title']!r}: {expr!r} names no peftu series"
            assert series <= exported, f"panel {panel['title']!r} names {series - exported}, not exported"
            named |= series
    for family in ("requests", "tokens", "time_to_first_token", "inter_token", "adapter_hits", "adapter_loads",
                   "adapter_errors", "requests_waiting", "queue_wait", "kv_tokens"):
        assert any(family in s for s in named), f"no panel shows {family}"
