"""HTTP routes: health, model metadata and predictions (TorchServe-compatible paths)."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from serve.access import request_trace
from serve.response_notes import note
from serve.errors import InvalidRequestError, NotReadyError
from serve.http_io import VERSION_HEADER, client_of, client_timeout, read_images
from serve.lifecycle import Change, Lifecycle, parse_new_version
from serve.service import Answer, Call, Inputs, PredictionService

bp = Blueprint("serve", __name__)
management = Blueprint("management", __name__)


def service() -> PredictionService:
    return current_app.extensions["serve"]


@bp.get("/ping")
def ping():
    return jsonify(status="Healthy")


@bp.get("/ready")
def ready():
    table = service().table
    if not table.ready:
        raise NotReadyError("models are still loading")
    return jsonify(status="ready", models=list(table.models))


@bp.get("/metrics")
def metrics():
    body, content_type = current_app.extensions["serve.metrics"].render()
    return body, 200, {"Content-Type": content_type}


@bp.get("/openapi.json")
def openapi():
    return jsonify(current_app.extensions["serve.openapi"])


@bp.get("/models")
def list_models():
    table = service().table
    return jsonify(models=[table.describe_model(name) for name in table.wanted])


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<version>")
def describe_model(name: str, version: str | None = None):
    return jsonify(service().table.describe_model(name, version))


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
    return jsonify({**service().table.describe(served), "rollout": change.rollout.to_dict()})


@bp.route("/predictions", methods=["POST", "PUT"])
@bp.route("/predictions/<name>", methods=["POST", "PUT"])
@bp.route("/predictions/<name>/<version>", methods=["POST", "PUT"])
def predict(name: str | None = None, version: str | None = None):
    many = False

    def read(_served) -> Inputs:
        nonlocal many
        images, many = read_images(request, service().settings.max_images_per_request)
        return Inputs(images)

    timeout_s, timeout_source = client_timeout(request)
    answer = service().predict(Call(read, name, version, request.args, request.args.get("format"), timeout_s,
                                    timeout_source, client_of(request), request_trace()))
    response = render_answer(answer, many)
    response.headers[VERSION_HEADER] = answer.tag
    return note(response, batch_size=answer.batch_size)


def render_answer(answer: Answer, many: bool) -> Response:
    """The task's answer for each image: JSON (a list for several files), TorchServe's shape, or a PNG.

    Raises: InvalidRequestError: a PNG asked for several images.
    """
    if answer.answer_format == "png":
        if many:
            raise InvalidRequestError("format=png answers one image; send one file, or use format=json")
        return Response(answer.png(), mimetype="image/png")
    if answer.answer_format == "torchserve":
        return jsonify(answer.torchserve())
    results = [result.to_dict() for result in answer.results()]
    return jsonify(results if many else results[0])
