"""The OpenAPI 3 document of every route, with the loaded model names as the path enum."""
from __future__ import annotations

from typing import Any

from serve.registry import Registry

VERSION = "0.1.0"


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json({"$ref": "#/components/schemas/Error"}, description)


IMAGE_BODY = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}},
                "additionalProperties": {"type": "string", "format": "binary"},
            }
        },
    },
}


def prediction_responses(result_refs: list[dict]) -> dict:
    """The answers of /predictions: one result per image (the served models' tasks), a list for several files."""
    one = result_refs[0] if len(result_refs) == 1 else {"oneOf": result_refs}
    return {
        "200": {"description": "one answer per image; a list when several files were sent; with "
                               "format=torchserve, TorchServe's handler shape; with format=png (segment), the mask",
                "content": {"application/json": {"schema": {"anyOf": [one, {"type": "array", "items": one}, {}]}},
                            "image/png": {"schema": {"type": "string", "format": "binary"}}}},
        "400": _error("undecodable image or bad request"),
        "404": _error("unknown model"),
        "413": _error("body, pixels or files over the limits"),
        "415": _error("not an image content type"),
        "503": _error("overloaded (with Retry-After) or timed out"),
    }


def merged_parameters(parameters: list[dict]) -> list[dict]:
    """One entry per parameter name; where models differ, the narrowest maximum (it holds for every model)."""
    merged: dict[str, dict] = {}
    for param in parameters:
        kept = merged.setdefault(param["name"], param)
        maximum = param["schema"].get("maximum")
        if maximum is not None and maximum < kept["schema"].get("maximum", maximum + 1):
            merged[param["name"]] = param
    return list(merged.values())


def result_schemas(result_types) -> tuple[dict[str, dict], list[dict]]:
    """Components generated from the tasks' pydantic result models, and a $ref to each."""
    components: dict[str, dict] = {}
    refs = []
    for result_type in result_types:
        schema = result_type.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        components.update(schema.pop("$defs", {}))
        components[result_type.__name__] = schema
        refs.append({"$ref": f"#/components/schemas/{result_type.__name__}"})
    return components, refs


def build_openapi(registry: Registry, extra_paths: dict[str, Any] | None = None,
                  management: bool = False) -> dict[str, Any]:
    """The document for this server's routes; `extra_paths` adds blueprints' own (the V2 protocol),
    `management` the reload route where it is served. The page's static files (/ui/...) are left out."""
    names = list(registry.predictors)
    tasks = {p.task.name: p.task for p in registry.predictors.values()}
    results, refs = result_schemas(dict.fromkeys(type(t).Result for t in tasks.values()))
    query = merged_parameters([p for t in tasks.values() for p in t.query_parameters()])
    query.append({"name": "format", "in": "query", "required": False,
                  "schema": {"type": "string", "enum": sorted({f for t in tasks.values() for f in t.formats})},
                  "description": "json (the default), torchserve (TorchServe's handler answer), png (a segment mask itself)"})
    model_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}
    predict = {"requestBody": IMAGE_BODY, "responses": prediction_responses(refs), "parameters": query}
    paths: dict[str, Any] = {
        "/": {"get": {"summary": "The web page: drop a photo, see the top-k", "responses": {"200": {
            "description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/ping": {"get": {"summary": "Liveness", "responses": {"200": _json(
            {"type": "object", "properties": {"status": {"const": "Healthy"}}, "required": ["status"]})}}},
        "/ready": {"get": {"summary": "Readiness: every model loaded and warm", "responses": {
            "200": _json({"type": "object", "properties": {"status": {"const": "ready"},
                          "models": {"type": "array", "items": {"type": "string"}}}, "required": ["status", "models"]}),
            "503": _error("still loading")}}},
        "/models": {"get": {"summary": "Metadata of every model", "responses": {"200": _json(
            {"type": "object", "properties": {"models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}},
             "required": ["models"]})}}},
        "/models/{name}": {"get": {"summary": "Metadata of one model", "parameters": [model_param],
                                   "responses": {"200": _json({"$ref": "#/components/schemas/Model"}),
                                                 "404": _error("unknown model")}}},
        "/predictions": {"post": {"summary": "Predict with the first model", **predict},
                         "put": {"summary": "Predict with the first model", **predict}},
        "/predictions/{name}": {
            "post": {"summary": "Predict for one or more images", **predict, "parameters": [model_param, *query]},
            "put": {"summary": "Predict for one or more images", **predict, "parameters": [model_param, *query]},
        },
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "exposition text", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json({"type": "object"})}}},
    }
    if management:
        paths["/models/{name}/reload"] = {"post": {
            "summary": "Re-read the checkpoint; the new weights serve once loaded and warm (this worker only)",
            "parameters": [model_param],
            "responses": {"200": _json({"$ref": "#/components/schemas/Model"}), "404": _error("unknown model"),
                          "409": _error("reload failed: the previous weights keep serving")}}}
    paths.update(extra_paths or {})
    return {
        "openapi": "3.1.0",
        "info": {"title": "torch-serve", "version": VERSION,
                 "description": "PyTorch image models (classify, detect, segment, embed): TorchServe-style routes "
                                "and the Open Inference Protocol (V2)."},
        "paths": paths,
        "components": {"schemas": {**SCHEMAS, **results}},
    }


SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "Model": {"type": "object", "required": ["name", "architecture", "device", "ready", "input", "num_classes",
                                             "num_labels", "topk", "checkpoint", "load_time_s"], "properties": {
        "name": {"type": "string"}, "architecture": {"type": "string"}, "device": {"type": "string"},
        "ready": {"type": "boolean"},
        "input": {"type": "object", "required": ["shape", "mode"], "properties": {
            "shape": {"type": "array", "items": {"type": "integer"}}, "mode": {"type": "string", "enum": ["RGB", "L"]},
            "resize": {"type": "integer"}, "crop": {"type": "integer"},
            "mean": {"type": "array", "items": {"type": "number"}}, "std": {"type": "array", "items": {"type": "number"}},
            "interpolation": {"type": "string"}}},
        "num_classes": {"type": ["integer", "null"]}, "num_labels": {"type": "integer"},
        "topk": {"type": "integer"},
        "checkpoint": {"type": "object", "properties": {"file": {"type": "string"}, "sha256": {"type": "string"},
                       "layout": {"type": "string"}, "skipped_keys": {"type": "integer"}}},
        "load_time_s": {"type": "number"}}},
}


def _v2_error(description: str) -> dict:
    return _json({"$ref": "#/components/schemas/V2Error"}, description)


def v2_paths(names: list[str]) -> dict[str, Any]:
    """The Open Inference Protocol (KServe V2) REST routes that serve/v2.py answers."""
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    tensor_meta = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}}}}
    metadata = {"summary": "Model metadata", "responses": {
        "200": _json({"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"], "properties": {
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"}, "inputs": {"type": "array", "items": tensor_meta},
            "outputs": {"type": "array", "items": tensor_meta}}}),
        "404": _v2_error("unknown model or version")}}
    ready = {"summary": "Model readiness", "responses": {
        "200": _json({"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}),
        "404": _v2_error("unknown model or version")}}
    infer = {"summary": "Inference: FP32 [N,C,H,W] tensor 'input' or BYTES [N] encoded images 'image'; "
                        "JSON or the binary tensor extension (Inference-Header-Content-Length)",
             "requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
             "responses": {
                 "200": {"description": "outputs (JSON, or JSON header + binary tensors)", "content": {
                     "application/json": {"schema": {"$ref": "#/components/schemas/V2InferResponse"}},
                     "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                 "400": _v2_error("malformed request, wrong shape or datatype, undecodable image"),
                 "404": _v2_error("unknown model or version"),
                 "413": _v2_error("body or image over the limits"),
                 "415": _v2_error("unknown Content-Encoding"),
                 "503": _v2_error("overloaded or timed out")}}
    return {
        "/v2/health/live": {"get": {"summary": "Server liveness", "responses": {"200": _json(
            {"type": "object", "properties": {"live": {"type": "boolean"}}})}}},
        "/v2/health/ready": {"get": {"summary": "Server readiness", "responses": {
            "200": _json({"type": "object", "properties": {"ready": {"type": "boolean"}}}),
            "503": _json({"type": "object", "properties": {"ready": {"type": "boolean"}}}, "not ready")}}},
        "/v2": {"get": {"summary": "Server metadata", "responses": {"200": _json({
            "type": "object", "required": ["name", "version", "extensions"], "properties": {
                "name": {"type": "string"}, "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}}}})}}},
        "/v2/models/{name}": {"get": {**metadata, "parameters": [name]}},
        "/v2/models/{name}/versions/{version}": {"get": {**metadata, "parameters": [name, version]}},
        "/v2/models/{name}/ready": {"get": {**ready, "parameters": [name]}},
        "/v2/models/{name}/versions/{version}/ready": {"get": {**ready, "parameters": [name, version]}},
        "/v2/models/{name}/infer": {"post": {**infer, "parameters": [name]}},
        "/v2/models/{name}/versions/{version}/infer": {"post": {**infer, "parameters": [name, version]}},
    }


V2_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
    "datatype": {"type": "string"}, "parameters": {"type": "object"},
    "data": {"type": "array", "items": {}}}}
SCHEMAS.update({
    "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "V2InferRequest": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": V2_TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}}}},
    "V2InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "parameters": {"type": "object"}, "outputs": {"type": "array", "items": V2_TENSOR}}},
})
