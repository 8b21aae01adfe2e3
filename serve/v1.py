"""KServe's V1 data plane (TensorFlow Serving's REST predict API) under /v1, as a Blueprint: `app.register_blueprint(v1)`.

Routes (https://kserve.github.io/website/latest/modelserving/data_plane/v1_protocol/):

    GET  /v1/models                                      {"models": [name, ...]}
    GET  /v1/models/<name>                               {"name": name, "ready": true}
    POST /v1/models/<name>[/versions/<v>]:predict        {"instances": [...]} -> {"predictions": [...]}
    POST /v1/models/<name>[/versions/<v>]:explain        501: this server has no explainer

Each instance is one image, in any of the forms V1 clients send:

- a base64 string (KServe's own examples);
- {"b64": "<base64>"} (TensorFlow Serving's form for binary values);
- {"data": "<base64>"} (TorchServe's KServe envelope);
- for a task that takes tensors (classify, embed), nested numbers [C, H, W] already preprocessed, bare
  or as {"data": [[...]]}; every instance of a request is then a tensor.

Each prediction is the task's answer for that image, exactly as POST /predictions/<name> answers it
(`Answer.results()[i].to_dict()`). Tensor instances have no image to map results back to: each
prediction is then {output name: values} with the model's V2 outputs (probabilities, embedding).
The task's parameters come from the query string (?topk=3), the deadline from X-Request-Timeout-Ms;
the answer carries X-Model-Version. Errors are KServe's shape, {"error": "message"}, with the same
statuses as the other routes (400, 404, 413 over max_images_per_request or the body limit, 503).
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from flask import Blueprint, current_app, request

from serve.access import request_trace
from serve.response_notes import note
from serve.errors import InvalidRequestError, TooManyImagesError
from serve.http_io import (
    VERSION_HEADER,
    answer_errors_as_messages,
    client_of,
    client_timeout,
    compact_json,
    read_whole_body,
)
from serve.model_table import Served
from serve.service import Answer, Call, Inputs, PredictionService

v1 = Blueprint("v1", __name__)
answer_errors_as_messages(v1)


def service() -> PredictionService:
    return current_app.extensions["serve"]


@v1.get("/v1/models")
def list_models():
    return compact_json({"models": list(service().table.wanted)})


@v1.get("/v1/models/<name>")
def model_ready(name: str):
    table = service().table
    if table.is_lazy(name) and name not in table.models:
        return compact_json({"name": name, "ready": False})  # load: lazy, not loaded now: the first prediction loads it
    return compact_json({"name": table.served(name).name, "ready": True})  # served only once warm


@v1.post("/v1/models/<name>:predict")
@v1.post("/v1/models/<name>/versions/<version>:predict")
def predict(name: str, version: str | None = None):
    def read(served: Served) -> Inputs:
        body = read_whole_body(request)
        return parse_instances(body, served, service().settings.max_images_per_request)

    timeout_s, timeout_source = client_timeout(request)
    answer = service().predict(Call(read, name, version, request.args, "json", timeout_s, timeout_source,
                                    client_of(request), request_trace()))
    response = compact_json({"predictions": predictions(answer)})
    response.headers[VERSION_HEADER] = answer.tag
    return note(response, batch_size=answer.batch_size)


@v1.post("/v1/models/<name>:explain")
@v1.post("/v1/models/<name>/versions/<version>:explain")
def explain(name: str, version: str | None = None):
    service().table.served(name, version)  # an unknown model is still a 404
    return note(compact_json({"error": f"model '{name}' has no explainer; use :predict"}, 501), error_code="not_implemented")


def predictions(answer: Answer) -> list[Any]:
    """Each instance's prediction: the task's result, or the V2 outputs' values for a tensor instance."""
    if answer.prepared is not None:
        return [result.to_dict() for result in answer.results()]
    tensors = answer.v2_tensors({})
    return [{t.name: np.asarray(t.data[i]).tolist() for t in tensors} for i in range(len(answer.outputs))]


def parse_instances(body: bytes, served: Served, max_images: int) -> Inputs:
    """The request's instances as encoded images or one float batch [N, C, H, W].

    Raises:
        InvalidRequestError: not a JSON object with a non-empty 'instances' list, an instance in none of
            the forms, invalid base64, images and tensors mixed, or a tensor of the wrong shape.
        TooManyImagesError: more instances than max_images_per_request.
    """
    if not body.strip():
        raise InvalidRequestError('the request body is empty; send {"instances": [...]}')
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict) or "instances" not in document:
        raise InvalidRequestError('the request must be a JSON object with "instances": a list of images '
                                  '(base64 strings, {"b64": ...} or {"data": ...})')
    instances = document["instances"]
    if not isinstance(instances, list) or not instances:
        raise InvalidRequestError("'instances' must be a non-empty list")
    if len(instances) > max_images:
        raise TooManyImagesError(f"{len(instances)} instances in one request; the limit is {max_images}")
    values = [_unwrap(item, i) for i, item in enumerate(instances)]
    if all(isinstance(v, str) for v in values):
        return Inputs(images=[_decode_b64(v, i) for i, v in enumerate(values)])
    if any(isinstance(v, str) for v in values):
        raise InvalidRequestError("instances mix images (base64) and tensors (numbers); send one kind per request")
    return Inputs(tensor=_tensor(values, served))


def _unwrap(item: Any, index: int) -> Any:
    if isinstance(item, dict):
        keys = set(item) & {"b64", "data"}
        if len(keys) != 1:
            raise InvalidRequestError(f'instance {index + 1}: an object must hold "b64" or "data" (one of them), '
                                      f"got keys {sorted(item)[:8]}")
        item = item[keys.pop()]
    if isinstance(item, (str, list)):
        return item
    raise InvalidRequestError(f"instance {index + 1}: expected a base64 string, {{\"b64\": ...}}, {{\"data\": ...}} "
                              f"or nested numbers, got {type(item).__name__}")


def _decode_b64(text: str, index: int) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"instance {index + 1} is not valid base64 (images are sent base64-encoded)") from None
    if not data:
        raise InvalidRequestError(f"instance {index + 1} is empty")
    return data


def _tensor(values: list[list], served: Served) -> np.ndarray:
    task = served.task
    shape = list(task.input_shape)
    if not task.fixed_size:
        raise InvalidRequestError(f"task '{task.name}' of model '{served.name}' takes images only; send each "
                                  "instance as base64")
    try:
        array = np.asarray(values)
    except (ValueError, RecursionError):
        raise InvalidRequestError("the tensor instances are ragged nested lists") from None
    if array.dtype.kind not in "iuf":
        raise InvalidRequestError("tensor instances must hold numbers only")
    if list(array.shape[1:]) != shape:
        raise InvalidRequestError(f"each tensor instance must have shape {shape} (C, H, W, preprocessed as the "
                                  f"model expects); got {list(array.shape[1:])}")
    return array.astype(np.float32)
