"""Validate Kubernetes objects strictly, as the API server would, without a cluster.

KubeRay objects (ray.io/v1) and the Prometheus Operator's (monitoring.coreos.com/v1: the
PodMonitor of k8s/monitoring) are checked against the `openAPIV3Schema` of their CRD (the
folders `shared/kuberay-crds` and `shared/prometheus-operator-crds`, beside the repository). CRD schemas are structural: Kubernetes
prunes or, with kubectl's default strict field validation, rejects any field the schema does
not name, so every object schema without `additionalProperties` or
`x-kubernetes-preserve-unknown-fields` is closed here (an object schema with no properties at
all accepts no field). `x-kubernetes-int-or-string` is the `anyOf` integer/string the CRDs
already carry; int32/int64 formats are range-checked. CEL rules (`x-kubernetes-validations`)
are not evaluated: setting a field that carries one is reported, so it cannot pass unchecked.
Object metadata and core kinds (Secret, ConfigMap, ServiceAccount, ...) are checked with the
strict Kubernetes schemas of the `kubernetes-validate` package.

    python -m cluster.validate k8s/overlays/cpu k8s/overlays/gpu k8s/monitoring   # exit 1 on errors
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.32"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CRDS = REPO.parent / "shared" / "kuberay-crds"
DEFAULT_PROMETHEUS_CRDS = REPO.parent / "shared" / "prometheus-operator-crds"
_INT_RANGES = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}


def crd_dirs() -> tuple[Path, ...]:
    """`$PEFTU_KUBERAY_CRDS` and `$PEFTU_PROMETHEUS_CRDS`, else ../shared/{kuberay,prometheus-operator}-crds."""
    return (Path(os.environ.get("PEFTU_KUBERAY_CRDS") or DEFAULT_CRDS),
            Path(os.environ.get("PEFTU_PROMETHEUS_CRDS") or DEFAULT_PROMETHEUS_CRDS))


def strict_schema(schema: Any) -> Any:
    """A copy of a structural CRD schema in which every object refuses the fields it does not name."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf")
           else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {name: strict_schema(s) for name, s in schema["properties"].items()}
    if (schema.get("type") == "object" and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _cel_rules(validator, rules, instance, schema) -> Iterator[jsonschema.ValidationError]:
    messages = "; ".join(r.get("message", r["rule"]) for r in rules)
    yield jsonschema.ValidationError(f"sets a field with CEL rules that are not evaluated here ({messages})")


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    for fmt, (low, high) in _INT_RANGES.items():
        checker.checks(fmt)(lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high)
    return checker


_CrdValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-validations": _cel_rules})


@cache
def crd_validators(folders: tuple[Path, ...] | None = None) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a strict validator, for every served version of every CRD in `folders`."""
    files = []
    for folder in folders or crd_dirs():
        found = sorted(folder.glob("*.yaml"))
        if not found:
            raise FileNotFoundError(f"no CRD files in {folder} (set PEFTU_KUBERAY_CRDS / PEFTU_PROMETHEUS_CRDS)")
        files += found
    validators = {}
    for path in files:
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = strict_schema(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: see errors()
                validators[(f"{group}/{version['name']}", kind)] = _CrdValidator(schema, format_checker=_format_checker())
    return validators


def errors(obj: dict[str, Any]) -> list[str]:
    """Every reason the API server would refuse `obj` (empty when it is valid); each names the field."""
    name = f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    validator = crd_validators().get(key)
    if validator is None:
        return [f"{name}: {e}" for e in _core_errors(obj)]
    found = [f"{name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
             for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    # The CRD schema says only `metadata: object`; the API server checks it as ObjectMeta.
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata")}
    return found + [f"{name}: {e}" for e in _core_errors(meta)]


def _core_errors(obj: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def serve_config_errors(text: str) -> list[str]:
    """Why Ray Serve would refuse a serve config (serveConfigV2, `serve deploy` YAML), unknown keys included.

    Ray's ServeDeploySchema ignores keys it does not know, so a misspelt option would be
    dropped silently; here every key must be a field of the model at its place.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(text)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return list(_unknown_keys(ServeDeploySchema, config, ""))


def _unknown_keys(model: type, data: Any, where: str) -> Iterator[str]:
    from pydantic import BaseModel

    if not isinstance(data, dict):
        return
    fields = {alias: f for name, f in model.model_fields.items() for alias in (name, f.alias) if alias}
    for key, value in data.items():
        if key not in fields:
            yield f"{where}{key}: unknown field of {model.__name__}"
            continue
        inner = [t for t in _leaf_types(fields[key].annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        for item, at in ([(v, f"{where}{key}.{i}.") for i, v in enumerate(value)] if isinstance(value, list)
                         else [(value, f"{where}{key}.")]):
            if inner:
                yield from _unknown_keys(inner[0], item, at)


def _leaf_types(annotation: Any) -> Iterator[Any]:
    import typing

    args = typing.get_args(annotation)
    if not args:
        yield annotation
    for arg in args:
        yield from _leaf_types(arg)


def main(argv: list[str] | None = None) -> int:
    from .kustomize import build

    parser = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="kustomization folders (k8s/overlays/cpu, ...) or YAML files")
    bad = 0
    for target in parser.parse_args(argv).folders:
        path = Path(target)
        objects = build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
        for obj in objects:
            problems = errors(obj)
            bad += bool(problems)
            print(f"{target}: {obj['kind']}/{obj['metadata']['name']}: " + ("ok" if not problems else "INVALID"))
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
