"""HTTP routes: health, model metadata and predictions (TorchServe-compatible paths)."""
from __future__ import annotations

from flask import Blueprint, Request, Response, current_app, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from serve.admission import TIMEOUT_HEADER, header_timeout_s
from serve.errors import (
    InvalidRequestError,
    NotReadyError,
    ServeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)
from serve.lifecycle import Change, Lifecycle, parse_new_version
from serve.predictor import Predictor
from serve.registry import Registry, Served
from serve.tasks.base import Prepared, Task

bp = Blueprint("serve", __name__)
management = Blueprint("management", __name__)
# Bodies taken as raw image bytes; curl --data-binary sends form-urlencoded unless told otherwise.
RAW_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded", "")
# On every prediction answer: "<version> <first 12 hex digits of the checkpoint's sha256>".
VERSION_HEADER = "X-Model-Version"


def registry() -> Registry:
    return current_app.extensions["serve"]


@bp.get("/ping")
def ping():
    return jsonify(status="Healthy")


@bp.get("/ready")
def ready():
    reg = registry()
    if not reg.ready:
        raise NotReadyError("models are still loading")
    return jsonify(status="ready", models=list(reg.models))


@bp.get("/metrics")
def metrics():
    body, content_type = current_app.extensions["serve.metrics"].render()
    return body, 200, {"Content-Type": content_type}


@bp.get("/openapi.json")
def openapi():
    return jsonify(current_app.extensions["serve.openapi"])


@bp.get("/models")
def list_models():
    reg = registry()
    return jsonify(models=[model_metadata(reg.served(name)) for name in reg.models])


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<version>")
def describe_model(name: str, version: str | None = None):
    return jsonify(model_metadata(registry().served(name, version)))


def model_metadata(served: Served) -> dict:
    """A version's metadata (its default's for a model), with the model's versions and its default."""
    model = registry().versions(served.name)
    return {**served.predictor.metadata(), "version": served.version, "default_version": model.default,
            "versions": [{"version": v, "sha256": s.predictor.loaded.sha256, "checkpoint": s.source.checkpoint,
                          "default": v == model.default} for v, s in model.versions.items()]}


# --- management: every worker applies these (serve/lifecycle.py) --------------------------------------


def lifecycle() -> Lifecycle:
    return current_app.extensions["serve.lifecycle"]


@management.post("/models/<name>/reload")
@management.post("/models/<name>/versions/<version>/reload")
def reload_model(name: str, version: str | None = None):
    change = lifecycle().reload(name, version)
    return changed(change, version or change.versions.default)


@management.post("/models/<name>/versions")
def load_version(name: str):
    new = parse_new_version(request.get_json(silent=True))
    return changed(lifecycle().load(name, new), new.version), 201


@management.put("/models/<name>/versions/<version>/set-default")
def set_default_version(name: str, version: str):
    return changed(lifecycle().set_default(name, version))


@management.delete("/models/<name>/versions/<version>")
def unload_version(name: str, version: str):
    return changed(lifecycle().unload(name, version))


def changed(change: Change, version: str | None = None) -> Response:
    """A management answer: the version's metadata (the default's), and how many workers serve the change."""
    served = change.versions.versions[version or change.versions.default]
    return jsonify({**model_metadata(served), "rollout": change.rollout.to_dict()})


@bp.route("/predictions", methods=["POST", "PUT"])
@bp.route("/predictions/<name>", methods=["POST", "PUT"])
@bp.route("/predictions/<name>/<version>", methods=["POST", "PUT"])
def predict(name: str | None = None, version: str | None = None):
    reg = registry()
    served = reg.served(name or reg.default_name, version)
    predictor = served.predictor
    params = predictor.task.parse_params(request.args)
    answer_format = parse_format(request, predictor)
    deadline = reg.deadline(header_timeout_s(request.headers), f"{request.headers.get(TIMEOUT_HEADER)} ms ({TIMEOUT_HEADER})")
    reg.admit(served.name, 1, deadline)
    images, many = read_images(request, reg.config.server.max_images_per_request)
    prepared = [preprocess_one(predictor, data, i, len(images)) for i, data in enumerate(images)]
    inference = reg.infer(served, [p.tensor for p in prepared], deadline)
    g.batch_size = inference.batch_size  # for the access log
    answer = render_answer(predictor.task, inference.outputs, prepared, params, answer_format, many)
    answer.headers[VERSION_HEADER] = served.tag
    return answer


def parse_format(req: Request, predictor: Predictor) -> str:
    """?format=json|torchserve|png (those the task answers); default: the model's response_format.

    Raises: InvalidRequestError: a format the task doesn't answer.
    """
    answer_format = req.args.get("format", predictor.spec.response_format)
    if answer_format not in predictor.task.formats:
        raise InvalidRequestError(f"format must be one of {list(predictor.task.formats)} for task "
                                  f"'{predictor.task.name}', got '{answer_format[:40]}'")
    return answer_format


def render_answer(task: Task, outputs: list, prepared: list[Prepared], params: dict, answer_format: str,
                  many: bool) -> Response:
    """The task's answer for each image: JSON (a list for several files), TorchServe's shape, or a PNG.

    Raises: InvalidRequestError: a PNG asked for several images.
    """
    if answer_format == "png":
        if many:
            raise InvalidRequestError("format=png answers one image; send one file, or use format=json")
        return Response(task.png(outputs[0], prepared[0]), mimetype="image/png")
    if answer_format == "torchserve":
        return jsonify(task.torchserve(outputs, prepared, params))
    results = [task.finish(o, p, params).to_dict() for o, p in zip(outputs, prepared)]
    return jsonify(results if many else results[0])


def read_images(req: Request, limit: int) -> tuple[list[bytes], bool]:
    """Return the request's image payloads and whether it asked for a list answer (several files).

    Raises:
        InvalidRequestError: multipart without a file, or an empty body.
        TooManyImagesError: more files than `limit`.
        UnsupportedMediaTypeError: a body that can't be an image (JSON, text, ...).
    """
    mimetype = req.mimetype
    if mimetype == "multipart/form-data":
        try:
            files = [f for key in req.files for f in req.files.getlist(key)]
        except RequestEntityTooLarge:
            if req.content_length is None or req.content_length > current_app.config["MAX_CONTENT_LENGTH"]:
                raise
            # Within the byte limit, so it was the part count (MAX_FORM_PARTS) that ran out. Read the
            # rest of the body, so the keep-alive connection is left at the next request's start.
            while req.input_stream.read(1 << 16):
                pass
            raise TooManyImagesError(f"more parts in the multipart body than {limit} images allow") from None
        if not files:
            raise InvalidRequestError("multipart request holds no file; send the image as a file field (-F image=@cat.jpg)")
        if len(files) > limit:
            raise TooManyImagesError(f"{len(files)} images in one request; the limit is {limit}")
        return [f.read() for f in files], len(files) > 1
    if mimetype.startswith("image/") or mimetype in RAW_TYPES:
        data = read_whole_body(req)
        if not data:
            raise InvalidRequestError("the request body is empty; send image bytes or multipart/form-data")
        return [data], False
    raise UnsupportedMediaTypeError(
        f"Content-Type '{mimetype}' is not supported; send image bytes (image/*, application/octet-stream) "
        "or multipart/form-data"
    )


def read_whole_body(req: Request) -> bytes:
    """The body, up to MAX_CONTENT_LENGTH.

    Raises:
        RequestEntityTooLarge: longer, also for a chunked body (no Content-Length), which werkzeug
            silently cuts at the limit.
    """
    data = req.get_data(cache=False)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit and req.content_length is None and len(data) >= limit and req.input_stream.read(1):
        raise RequestEntityTooLarge()
    return data


def preprocess_one(predictor: Predictor, data: bytes, index: int, count: int) -> Prepared:
    """Decode one upload; with several, the error names which one failed."""
    try:
        return predictor.preprocess(data)
    except ServeError as exc:
        if count == 1:
            raise
        raise type(exc)(f"image {index + 1} of {count}: {exc.message}") from None
