"""`kustomize build` for the parts k8s/ uses, so tests render the manifests without a cluster or binary.

Supported kustomization fields: `resources` (files and folders), `patches` (JSON 6902 patch
lists, inline or from a file, aimed by `target.kind`/`target.name`), `images` (`name` ->
`newName`/`newTag` on every `containers[]`/`initContainers[]` image, CRDs included) and
`labels` (`pairs` on metadata.labels only). Any other field is an error rather than silently
ignored, so a manifest can never mean one thing here and another to `kubectl apply -k`;
tests/test_k8s.py compares the output with `kubectl kustomize` where kubectl is installed.

    python -m cluster.kustomize k8s/overlays/gpu      # prints the rendered YAML
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images", "labels"}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot build; the message names the file and field."""


def build(folder: str | Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` outputs, in resource order."""
    folder = Path(folder)
    path = folder / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{folder}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    if unknown := set(spec) - SUPPORTED:
        raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)} (supported: {sorted(SUPPORTED)})")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = folder / entry
        if target.is_dir():
            objects += build(target)
        elif target.is_file():
            objects += [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
        else:
            raise KustomizeError(f"{path}: resource {entry!r} does not exist")
    for patch in spec.get("patches", []):
        _apply_patch(objects, patch, folder, path)
    for image in spec.get("images", []):
        for obj in objects:
            _set_images(obj, image)
    for label in spec.get("labels", []):
        if set(label) - {"pairs"}:
            raise KustomizeError(f"{path}: labels support only `pairs`, got {sorted(label)}")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    return objects


def _apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any], folder: Path, path: Path) -> None:
    target = patch.get("target") or {}
    if set(target) - {"kind", "name"} or not target:
        raise KustomizeError(f"{path}: a patch target needs kind and/or name only, got {target}")
    text = (folder / patch["path"]).read_text() if "path" in patch else patch.get("patch", "")
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise KustomizeError(f"{path}: only JSON 6902 patches (a list of ops) are supported")
    hits = [i for i, obj in enumerate(objects)
            if target.get("kind", obj["kind"]) == obj["kind"]
            and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]]
    if not hits:
        raise KustomizeError(f"{path}: patch target {target} matches no resource")
    for i in hits:
        try:
            objects[i] = jsonpatch.apply_patch(objects[i], ops)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            raise KustomizeError(f"{path}: patch {patch.get('path', '')} on {target}: {e}") from e


def _set_images(node: Any, image: dict[str, str]) -> None:
    """Rewrite `name[:tag]` images in every containers/initContainers list below `node`."""
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, tag = _split_image(container.get("image", ""))
                    if name == image["name"]:
                        tag = image.get("newTag") or tag
                        new = image.get("newName", name)
                        container["image"] = f"{new}:{tag}" if tag else new
            _set_images(value, image)


def _split_image(image: str) -> tuple[str, str]:
    """`registry:5000/name:tag@digest` -> (`registry:5000/name`, `tag`)."""
    name, sep, tag = image.split("@")[0].rpartition(":")
    return (name, tag) if sep and "/" not in tag else (image.split("@")[0], "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.kustomize", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder with a kustomization.yaml (k8s/overlays/cpu, ...)")
    objects = build(parser.parse_args(argv).folder)
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")


if __name__ == "__main__":
    main()
