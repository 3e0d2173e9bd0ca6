"""Rebuild tests/infra/k8s_schema_subset.json from the real schemas (a maintainer tool, not a test).

The subset holds, for every Kubernetes document under infra/, only the part of its real schema
that the document uses: the field names, types, enums and required lists along the paths present
in the manifests. test_infra.py validates the manifests against it without a cluster. A field
that a manifest uses but the real schema lacks stops this script with its path, so a new or
misspelt field is caught here, and a field added to a manifest later without rebuilding the
subset fails the test as unknown.

Sources (neither is committed): the KubeRay CRDs (ray-operator/config/crd/bases in a KubeRay
checkout at the tag the README requires) and the official Kubernetes Python client, whose
pydantic models carry the core API's field names and types:

    pip install kubernetes==37.0.2 pyyaml      # in any throw-away venv
    git -C kuberay checkout v1.6.2
    python tests/infra/build_schema_subset.py kuberay/ray-operator/config/crd/bases
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("k8s_schema_subset.json")
MANIFESTS = ["infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml",
             "infra/kubernetes/cronjob.yaml", "infra/kubernetes/mlflow.yaml"]
CRDS = {("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
        ("ray.io/v1", "RayJob"): "ray.io_rayjobs.yaml"}
CORE = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
        ("batch/v1", "CronJob"): "V1CronJob"}
QUANTITY = {"x-kubernetes-int-or-string": True}  # resource quantities: 1, "500m", 2Gi


def from_annotation(ann: Any, field: str = "") -> dict[str, Any]:
    """The OpenAPI-style schema of a Kubernetes client (pydantic) annotation."""
    from pydantic import BaseModel
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return from_annotation(args[0], field)
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            return from_annotation(real[0], field)
        kinds = {from_annotation(a).get("type") for a in real}
        if kinds == {"integer", "string"}:
            return {"x-kubernetes-int-or-string": True}
        return {}
    if origin is list:
        return {"type": "array", "items": from_annotation(args[0])}
    if origin is dict:
        if field in {"limits", "requests"}:
            return {"type": "object", "additionalProperties": QUANTITY}
        return {"type": "object", "additionalProperties": from_annotation(args[1])}
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        props, required = {}, []
        for name, info in ann.model_fields.items():
            key = info.serialization_alias or name
            props[key] = ("model", info.annotation, name)
            if info.is_required():
                required.append(key)
        return {"type": "object", "properties": props, "required": required}
    return {str: {"type": "string"}, int: {"type": "integer"}, bool: {"type": "boolean"},
            float: {"type": "number"}}.get(ann, {})


def resolve(node: Any) -> dict[str, Any]:
    if isinstance(node, tuple):  # a lazily converted pydantic field
        return from_annotation(node[1], node[2])
    return node


KEEP = ("type", "enum", "format", "x-kubernetes-int-or-string")


def prune(schema: dict[str, Any], value: Any, path: str) -> dict[str, Any]:
    """The part of schema that value uses; SystemExit on a field the schema lacks."""
    schema = resolve(schema)
    out: dict[str, Any] = {k: schema[k] for k in KEEP if k in schema}
    if isinstance(value, dict) and "properties" in schema:
        out["properties"] = {}
        for key, sub in value.items():
            if key not in schema["properties"]:
                raise SystemExit(f"{path}.{key}: no such field in the real schema")
            out["properties"][key] = prune(schema["properties"][key], sub, f"{path}.{key}")
        if schema.get("required"):
            out["required"] = sorted(schema["required"])
    elif isinstance(value, dict) and "additionalProperties" in schema:
        out["additionalProperties"] = {}
        for key, sub in value.items():
            pruned = prune(schema["additionalProperties"], sub, f"{path}.{key}")
            out["additionalProperties"] = merge(out["additionalProperties"], pruned)
    elif isinstance(value, list) and "items" in schema:
        out["items"] = {}
        for i, sub in enumerate(value):
            out["items"] = merge(out["items"], prune(schema["items"], sub, f"{path}[{i}]"))
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {**a, **{k: v for k, v in b.items() if k not in {"properties", "items",
                                                            "additionalProperties"}}}
    for key in ("items", "additionalProperties"):
        if key in a or key in b:
            out[key] = merge(a.get(key, {}), b.get(key, {}))
    if "properties" in a or "properties" in b:
        pa, pb = a.get("properties", {}), b.get("properties", {})
        out["properties"] = {k: merge(pa.get(k, {}), pb.get(k, {})) for k in {**pa, **pb}}
    return out


def root_schema(api_version: str, kind: str, crd_dir: Path) -> dict[str, Any]:
    if (api_version, kind) in CRDS:
        crd = yaml.safe_load((crd_dir / CRDS[api_version, kind]).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == api_version.split("/")[1])
        return version["schema"]["openAPIV3Schema"]
    import kubernetes.client
    return from_annotation(getattr(kubernetes.client, CORE[api_version, kind]))


def main(crd_dir: Path) -> None:
    subset: dict[str, Any] = {}
    for manifest in MANIFESTS:
        for doc in yaml.safe_load_all((ROOT / manifest).read_text()):
            key = f"{doc['apiVersion']} {doc['kind']}"
            pruned = prune(root_schema(doc["apiVersion"], doc["kind"], crd_dir), doc, manifest)
            subset[key] = merge(subset.get(key, {}), pruned)
    OUT.write_text(json.dumps({
        "_source": "field names and types copied from the KubeRay v1.6.2 CRDs and the "
                   "Kubernetes Python client 37.0.2; pruned to what infra/ uses; rebuilt by "
                   "tests/infra/build_schema_subset.py",
        **dict(sorted(subset.items()))}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {sorted(subset)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
