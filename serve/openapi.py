"""The OpenAPI 3 document of every route, with the loaded model names as the path enum."""
from __future__ import annotations

from typing import Any

from serve.model_table import ModelTable

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


VERSION_HEADER = {"X-Model-Version": {"description": "the version that answered and the first 12 hex digits of "
                                                    "its checkpoint's sha256, e.g. '2 3b1c0f9e2a4d', then ' int8' "
                                                    "where precision int8 answered (docs/precision.md)",
                                     "schema": {"type": "string"}}}
TIMEOUT_PARAM = {"name": "X-Request-Timeout-Ms", "in": "header", "required": False,
                 "schema": {"type": "number", "exclusiveMinimum": 0},
                 "description": "the client's deadline in ms: 503 overloaded at once if the predicted wait is longer, "
                                "503 timeout if it passes while queued"}
VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}


def prediction_responses(result_refs: list[dict]) -> dict:
    """The answers of /predictions: one result per image (the served models' tasks), a list for several files."""
    one = result_refs[0] if len(result_refs) == 1 else {"oneOf": result_refs}
    return {
        "200": {"description": "one answer per image; a list when several files were sent; with "
                               "format=torchserve, TorchServe's handler shape; with format=png (segment), the mask",
                "headers": VERSION_HEADER,
                "content": {"application/json": {"schema": {"anyOf": [one, {"type": "array", "items": one}, {}]}},
                            "image/png": {"schema": {"type": "string", "format": "binary"}}}},
        "400": _error("undecodable image or bad request"),
        "404": _error("unknown model or version"),
        "413": _error("body, pixels or files over the limits"),
        "415": _error("not an image content type"),
        "503": _error("overloaded: the predicted wait is over the budget or the deadline (Retry-After: the "
                      "predicted wait, in s), or timed out"),
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


def build_openapi(table: ModelTable, extra_paths: dict[str, Any] | None = None,
                  management: bool = False) -> dict[str, Any]:
    """The document for this server's routes; `extra_paths` adds blueprints' own (the V2 protocol),
    `management` the reload route where it is served. The page's static files (/ui/...) are left out."""
    names = list(table.models)
    tasks = {p.task.name: p.task for p in table.predictors.values()}
    results, refs = result_schemas(dict.fromkeys(type(t).Result for t in tasks.values()))
    query = merged_parameters([p for t in tasks.values() for p in t.query_parameters()])
    query.append({"name": "format", "in": "query", "required": False,
                  "schema": {"type": "string", "enum": sorted({f for t in tasks.values() for f in t.formats})},
                  "description": "json (the default), torchserve (TorchServe's handler answer), png (a segment mask itself)"})
    model_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}
    query.append(TIMEOUT_PARAM)
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
        "/models/{name}": {"get": {"summary": "Metadata of one model (its default version), with its versions",
                                   "parameters": [model_param],
                                   "responses": {"200": _json({"$ref": "#/components/schemas/Model"}),
                                                 "404": _error("unknown model")}}},
        "/models/{name}/versions/{version}": {"get": {
            "summary": "Metadata of one version of a model", "parameters": [model_param, VERSION_PARAM],
            "responses": {"200": _json({"$ref": "#/components/schemas/Model"}),
                          "404": _error("unknown model or version")}}},
        "/predictions": {"post": {"summary": "Predict with the first model", **predict},
                         "put": {"summary": "Predict with the first model", **predict}},
        "/predictions/{name}": {
            "post": {"summary": "Predict for one or more images", **predict, "parameters": [model_param, *query]},
            "put": {"summary": "Predict for one or more images", **predict, "parameters": [model_param, *query]},
        },
        "/predictions/{name}/{version}": {
            "post": {"summary": "Predict with one version of a model", **predict,
                     "parameters": [model_param, VERSION_PARAM, *query]},
            "put": {"summary": "Predict with one version of a model", **predict,
                    "parameters": [model_param, VERSION_PARAM, *query]},
        },
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "exposition text", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json({"type": "object"})}}},
    }
    if management:
        for path, operations in management_paths(model_param).items():
            paths.setdefault(path, {}).update(operations)
    paths.update(extra_paths or {})
    return {
        "openapi": "3.1.0",
        "info": {"title": "torch-serve", "version": VERSION,
                 "description": "PyTorch image models (classify, detect, segment, embed): TorchServe-style routes "
                                "the Open Inference Protocol (V2) and KServe V1."},
        "paths": paths,
        "components": {"schemas": {**SCHEMAS, **results}},
    }


def management_paths(model_param: dict) -> dict[str, Any]:
    """The lifecycle routes (serve/lifecycle.py): each change is applied by every worker."""
    model = {"$ref": "#/components/schemas/Model"}
    failed = _error("the version doesn't load (nothing changed, the previous versions keep serving), or the "
                    "change contradicts the served versions (an existing version, unloading the default)")
    return {
        "/models/{name}/reload": {"post": {
            "summary": "Re-read the default version's checkpoint in every worker; each switches once loaded and warm",
            "parameters": [model_param],
            "responses": {"200": _json(model), "404": _error("unknown model"), "409": failed}}},
        "/models/{name}/versions/{version}/reload": {"post": {
            "summary": "Re-read one version's checkpoint in every worker", "parameters": [model_param, VERSION_PARAM],
            "responses": {"200": _json(model), "404": _error("unknown model or version"), "409": failed}}},
        "/models/{name}/versions": {"post": {
            "summary": "Load a new version from a file under models_dir, in every worker",
            "parameters": [model_param],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["version", "checkpoint"], "additionalProperties": False,
                "properties": {"version": {"type": "string"}, "checkpoint": {"type": "string"},
                               "sha256": {"type": "string"}, "default": {"type": "boolean"}}}}}},
            "responses": {"201": _json(model, "loaded and warm in this worker; the others follow"),
                          "400": _error("bad body, or a path outside models_dir"),
                          "404": _error("unknown model"), "409": failed}}},
        "/models/{name}/versions/{version}/set-default": {"put": {
            "summary": "Make a version the default in every worker", "parameters": [model_param, VERSION_PARAM],
            "responses": {"200": _json(model), "404": _error("unknown model or version"), "409": failed}}},
        "/models/{name}/versions/{version}": {"delete": {
            "summary": "Unload a version (not the default) in every worker", "parameters": [model_param, VERSION_PARAM],
            "responses": {"200": _json(model, "the model's metadata after the change"),
                          "404": _error("unknown model or version"), "409": failed}}},
    }


SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    # A lazy model not loaded now has only what its config says: name, architecture, device, task, versions.
    "Model": {"type": "object", "required": ["name", "architecture", "device", "ready", "loaded", "load", "bytes"],
              "properties": {
        "name": {"type": "string"}, "architecture": {"type": "string"}, "device": {"type": "string"},
        "ready": {"type": "boolean"}, "loaded": {"type": "boolean"},
        "load": {"type": "string", "enum": ["eager", "lazy"]}, "pin": {"type": "boolean"},
        "bytes": {"type": "integer", "description": "what the model holds in this worker once loaded"},
        "state": {"type": "string", "enum": ["LOADING", "UNAVAILABLE"]},
        "input": {"type": "object", "required": ["shape", "mode"], "properties": {
            "shape": {"type": "array", "items": {"type": "integer"}}, "mode": {"type": "string", "enum": ["RGB", "L"]},
            "resize": {"type": "integer"}, "crop": {"type": "integer"},
            "mean": {"type": "array", "items": {"type": "number"}}, "std": {"type": "array", "items": {"type": "number"}},
            "interpolation": {"type": "string"}}},
        "num_classes": {"type": ["integer", "null"]}, "num_labels": {"type": "integer"},
        "topk": {"type": "integer"},
        "checkpoint": {"type": "object", "properties": {"file": {"type": "string"}, "sha256": {"type": "string"},
                       "layout": {"type": "string"}, "skipped_keys": {"type": "integer"}}},
        "load_time_s": {"type": "number"},
        "version": {"type": "string"}, "default_version": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "object", "properties": {
            "version": {"type": "string"}, "sha256": {"type": "string"}, "checkpoint": {"type": "string"},
            "default": {"type": "boolean"}}}},
        "rollout": {"type": "object", "description": "management answers: the control generation, and how many "
                    "workers serve it", "properties": {"generation": {"type": "integer"}, "workers": {"type": "integer"},
                                                        "switched": {"type": "integer"}, "failed": {"type": "integer"}}}}},
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
        "404": _v2_error("unknown model or version"),
        "503": _v2_error("a lazy model not loaded now")}}
    ready = {"summary": "Model readiness", "responses": {
        "200": _json({"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}),
        "404": _v2_error("unknown model or version"),
        "503": _v2_error("a lazy model not loaded now")}}
    infer = {"summary": "Inference: FP32 [N,C,H,W] tensor 'input' or BYTES [N] encoded images 'image'; "
                        "JSON or the binary tensor extension (Inference-Header-Content-Length)",
             "requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
             "responses": {
                 "200": {"description": "outputs (JSON, or JSON header + binary tensors)", "headers": VERSION_HEADER,
                         "content": {
                     "application/json": {"schema": {"$ref": "#/components/schemas/V2InferResponse"}},
                     "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                 "400": _v2_error("malformed request, wrong shape or datatype, undecodable image"),
                 "404": _v2_error("unknown model or version"),
                 "413": _v2_error("body or image over the limits"),
                 "415": _v2_error("unknown Content-Encoding"),
                 "503": _v2_error("overloaded, timed out, or a lazy model still loading"),
                 "507": _v2_error("a lazy model larger than model_memory_budget")}}
    index = {"summary": "Repository index: every model version and its state (READY, LOADING, UNAVAILABLE)",
             "requestBody": {"required": False, "content": {"application/json": {"schema": {
                 "type": "object", "properties": {"ready": {"type": "boolean"}}}}}},
             "responses": {"200": _json({"type": "array", "items": {
                 "type": "object", "required": ["name", "version", "state"], "properties": {
                     "name": {"type": "string"}, "version": {"type": "string"},
                     "state": {"type": "string", "enum": ["READY", "LOADING", "UNAVAILABLE"]},
                     "reason": {"type": "string"}}}}),
                 "400": _v2_error("a body that is not a JSON object")}}
    return {
        "/v2/repository/index": {"post": index},
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
        "/v2/models/{name}/infer": {"post": {**infer, "parameters": [name, TIMEOUT_PARAM]}},
        "/v2/models/{name}/versions/{version}/infer": {"post": {**infer, "parameters": [name, version, TIMEOUT_PARAM]}},
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


def v1_paths(table: ModelTable) -> dict[str, Any]:
    """KServe's V1 data plane routes that serve/v1.py answers."""
    names = list(table.models)
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    tasks = {p.task.name: p.task for p in table.predictors.values()}
    _, refs = result_schemas(dict.fromkeys(type(t).Result for t in tasks.values()))
    query = merged_parameters([p for t in tasks.values() for p in t.query_parameters()])
    tensor_answer = {"type": "object", "additionalProperties": {"type": "array"},
                     "description": "a tensor instance's answer: the model's V2 outputs by name"}
    instance = {"oneOf": [
        {"type": "string", "description": "a base64-encoded image"},
        {"type": "object", "required": ["b64"], "properties": {"b64": {"type": "string"}}, "additionalProperties": False},
        {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"type": "string"}, {"type": "array"}]}},
         "additionalProperties": False},
        {"type": "array", "description": "a preprocessed float tensor [C, H, W] (classify, embed)"}]}
    predict = {
        "summary": "Predict (KServe V1): one image per instance; each prediction as POST /predictions answers it",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["instances"],
            "properties": {"instances": {"type": "array", "minItems": 1, "items": instance}}}}}},
        "responses": {
            "200": {"description": "one prediction per instance", "headers": VERSION_HEADER, "content": {
                "application/json": {"schema": {"type": "object", "required": ["predictions"], "properties": {
                    "predictions": {"type": "array", "items": {"anyOf": [*refs, tensor_answer]}}}}}}},
            "400": _v2_error("malformed body, invalid base64, undecodable image, wrong tensor shape"),
            "404": _v2_error("unknown model or version"),
            "413": _v2_error("body, pixels or instances over the limits"),
            "503": _v2_error("overloaded or timed out (Retry-After)")}}
    explain = {"summary": "Explain (KServe V1): not served", "responses": {
        "501": _v2_error("this server has no explainer"), "404": _v2_error("unknown model or version")}}
    return {
        "/v1/models": {"get": {"summary": "The served models (KServe V1)", "responses": {"200": _json(
            {"type": "object", "required": ["models"], "properties": {
                "models": {"type": "array", "items": {"type": "string"}}}})}}},
        "/v1/models/{name}": {"get": {"summary": "Model readiness (KServe V1)", "parameters": [name], "responses": {
            "200": _json({"type": "object", "required": ["name", "ready"], "properties": {
                "name": {"type": "string"}, "ready": {"type": "boolean"}}}),
            "404": _v2_error("unknown model")}}},
        "/v1/models/{name}:predict": {"post": {**predict, "parameters": [name, *query, TIMEOUT_PARAM]}},
        "/v1/models/{name}/versions/{version}:predict": {"post": {
            **predict, "parameters": [name, version, *query, TIMEOUT_PARAM]}},
        "/v1/models/{name}:explain": {"post": {**explain, "parameters": [name]}},
        "/v1/models/{name}/versions/{version}:explain": {"post": {**explain, "parameters": [name, version]}},
    }
