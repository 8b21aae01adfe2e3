"""Regenerate inferenceservice-v1beta1.schema.json from the KServe Python SDK's model classes.

The KServe SDK (`pip download --no-deps kserve==0.21.0`, a PyPI wheel) ships one generated class per
API type (kserve/models/v1beta1_*.py) with `openapi_types` (attribute -> type) and `attribute_map`
(attribute -> JSON field name); a setter that raises "must not be `None`" marks a required field.
This script reads those files with `ast` (nothing is imported, so the SDK's heavy dependencies are
not needed) and writes a JSON Schema (draft 2020-12) in which every KServe object forbids unknown
fields. Kubernetes types (V1Container, V1Probe, ...) become $refs into the Kubernetes definitions
bundled with the `kubernetes-validate` package (strict variant), so the containers, probes, volumes
and resources of an InferenceService are checked as strictly as those of a Deployment.

    pip download --no-deps kserve==0.21.0 -d /tmp/kserve
    python deploy/k8s/kserve/schema/generate.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl

Offline: the wheel is the only input; no CRD is fetched from anywhere.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import zipfile
from pathlib import Path

import kubernetes_validate.utils as kv

OUT = Path(__file__).with_name("inferenceservice-v1beta1.schema.json")
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"  # the $id of kubernetes-validate's _definitions.json
ROOT_CLASS = "V1beta1InferenceService"
# SDK type names that are not V1<Kind> of core/meta v1.
K8S_ALIASES = {
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "K8sIoApiAppsV1DeploymentStrategy": "io.k8s.api.apps.v1.DeploymentStrategy",
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior",
}
REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")
PRIMITIVES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "datetime": {"type": "string"},
    "date": {"type": "string"},
    "object": {},
}


def read_models(wheel: Path) -> tuple[dict[str, dict], str]:
    """{class name: {"types", "fields", "required"}} for every kserve/models/*.py, and the SDK version."""
    classes, version = {}, "unknown"
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(".dist-info/METADATA"):
                found = re.search(r"^Version: (\S+)", zf.read(name).decode(), re.M)
                version = found.group(1) if found else version
            if not re.fullmatch(r"kserve/models/[a-z0-9_]+\.py", name):
                continue
            source = zf.read(name).decode()
            for node in ast.parse(source).body:
                if isinstance(node, ast.ClassDef):
                    body = {t.targets[0].id: ast.literal_eval(t.value) for t in node.body
                            if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
                            and t.targets[0].id in ("openapi_types", "attribute_map")}
                    if "openapi_types" in body:
                        classes[node.name] = {
                            "types": body["openapi_types"],
                            "fields": body["attribute_map"],
                            "required": sorted(set(REQUIRED.findall(source))),
                        }
    return classes, version


def k8s_name(sdk_type: str, defs: dict) -> str | None:
    if sdk_type in K8S_ALIASES:
        return K8S_ALIASES[sdk_type]
    match = re.fullmatch(r"V1([A-Z]\w*)", sdk_type)
    if not match:
        return None
    for group in ("io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1."):
        if group + match.group(1) in defs:
            return group + match.group(1)
    return None


def build(classes: dict, defs: dict) -> tuple[dict, list[str]]:
    out_defs: dict[str, dict] = {}
    unchecked: set[str] = set()

    def schema_of(sdk_type: str) -> dict:
        sdk_type = sdk_type.strip()
        if sdk_type in PRIMITIVES:
            return dict(PRIMITIVES[sdk_type])
        if m := re.fullmatch(r"list\[(.+)\]", sdk_type):
            return {"type": "array", "items": schema_of(m.group(1))}
        if m := re.fullmatch(r"dict\(str, (.+)\)", sdk_type):
            return {"type": "object", "additionalProperties": schema_of(m.group(1))}
        if sdk_type in classes:
            add_class(sdk_type)
            return {"$ref": f"#/$defs/{sdk_type}"}
        if name := k8s_name(sdk_type, defs):
            if name not in defs:
                raise SystemExit(f"{sdk_type}: {name} is not in the Kubernetes definitions")
            return {"$ref": f"{K8S_DEFS}#/$defs/{name}"}
        unchecked.add(sdk_type)
        return {}

    def add_class(name: str) -> None:
        if name in out_defs:
            return
        spec = classes[name]
        out_defs[name] = {}  # placeholder against recursion
        out_defs[name] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {spec["fields"][attr]: schema_of(t) for attr, t in sorted(spec["types"].items())},
            **({"required": [spec["fields"][a] for a in spec["required"]]} if spec["required"] else {}),
        }

    add_class(ROOT_CLASS)
    return out_defs, sorted(unchecked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="a kserve-*.whl from PyPI")
    parser.add_argument("--kubernetes-version", default=kv.latest_version())
    args = parser.parse_args()
    classes, sdk_version = read_models(args.wheel)
    version = args.kubernetes_version
    defs = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)["$defs"]
    out_defs, unchecked = build(classes, defs)
    root = dict(out_defs.pop(ROOT_CLASS))
    root["properties"] = dict(root["properties"],
                              apiVersion={"const": "serving.kserve.io/v1beta1"},
                              kind={"const": "InferenceService"})
    root["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:torch-serve:kserve:v1beta1:InferenceService",
        "description": f"serving.kserve.io/v1beta1 InferenceService, generated by {Path(__file__).name} "
                       f"from the kserve {sdk_version} SDK model classes; Kubernetes types are $refs into "
                       f"kubernetes-validate's strict definitions for Kubernetes {version}.",
        "x-kserve-sdk-version": sdk_version,
        "x-kubernetes-version": version,
        "x-unchecked-types": unchecked,
        **root,
        "$defs": out_defs,
    }
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({len(out_defs) + 1} KServe types, unchecked: {unchecked or 'none'})")


if __name__ == "__main__":
    main()
