"""Model versions in-process: the YAML shape, /predictions/<name>/<version>, V2 versions, X-Model-Version on
every answer, metadata per version, and the lifecycle calls (load, set-default, unload, reload) with
their refusals, keys and scopes; two apps sharing a state_dir stand for two gunicorn workers."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from conftest import LABELS, image_bytes, metric, tiny_model_config, tiny_net, wait_until

from serve.config import build_config
from serve.errors import ConfigError

RED = image_bytes((255, 0, 0))


def shifted_net(shift: int):
    """tiny_net whose class i scores channel (i + shift) % 3: a red image is 'red' at shift 0, 'blue' at 1."""
    net = tiny_net()
    with torch.no_grad():
        net.fc.weight.copy_(torch.roll(torch.eye(3) * 2, shifts=shift, dims=1))
    return net


def save(path: Path, shift: int) -> Path:
    torch.save(shifted_net(shift).state_dict(), path)
    return path


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def label_for_shift(shift: int) -> str:
    return LABELS[(-shift) % 3]  # the class whose scored channel is red's


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    return {"a": save(tmp_path / "a.pth", 0), "b": save(tmp_path / "b.pth", 1), "c": save(tmp_path / "c.pth", 2)}


def versioned(files, **overrides) -> dict:
    spec = tiny_model_config(files["a"], versions=[{"version": 1, "checkpoint": str(files["a"])},
                                                   {"version": "2", "checkpoint": str(files["b"])}],
                             default_version="1", **overrides)
    del spec["checkpoint"]
    return spec


def post(client, path="/predictions/tiny", **options):
    return client.post(path, data=RED, content_type="image/png", **options)


def test_yaml_versions_are_served_by_name_and_the_default_without_one(files, make_app):
    client = make_app(versioned(files)).test_client()
    one, two = post(client), post(client, "/predictions/tiny/2")
    assert one.json["predictions"][0]["label"] == "red" and one.headers["X-Model-Version"] == f"1 {sha12(files['a'])}"
    assert two.json["predictions"][0]["label"] == "blue" and two.headers["X-Model-Version"] == f"2 {sha12(files['b'])}"
    assert post(client, "/predictions").headers["X-Model-Version"] == one.headers["X-Model-Version"]
    torchserve = post(client, "/predictions/tiny/2?format=torchserve")
    assert torchserve.headers["X-Model-Version"] == two.headers["X-Model-Version"] and "blue" in torchserve.get_data(as_text=True)
    missing = post(client, "/predictions/tiny/3")
    assert missing.status_code == 404 and missing.json["error"] == {
        "code": "model_not_found", "message": "model 'tiny' has no version '3'; versions: ['1', '2']"}


def test_a_model_without_versions_is_version_1(tiny_checkpoint, client):
    answer = post(client)
    assert answer.headers["X-Model-Version"] == f"1 {sha12(tiny_checkpoint)}"
    assert post(client, "/predictions/tiny/1").headers["X-Model-Version"] == answer.headers["X-Model-Version"]
    assert client.get("/models/tiny").json["versions"] == [
        {"version": "1", "sha256": hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest(),
         "checkpoint": str(tiny_checkpoint), "default": True}]


def test_metadata_lists_versions_and_describes_each(files, make_app):
    client = make_app(versioned(files)).test_client()
    model = client.get("/models/tiny").json
    assert (model["version"], model["default_version"]) == ("1", "1")
    assert [(v["version"], v["default"], v["sha256"][:12]) for v in model["versions"]] == [
        ("1", True, sha12(files["a"])), ("2", False, sha12(files["b"]))]
    two = client.get("/models/tiny/versions/2").json
    assert two["version"] == "2" and two["checkpoint"]["sha256"][:12] == sha12(files["b"])
    assert client.get("/models/tiny/versions/9").status_code == 404
    assert client.get("/models").json["models"][0]["version"] == "1"


def test_v2_serves_each_version_and_names_it(files, make_app):
    client = make_app(versioned(files)).test_client()
    assert client.get("/v2/models/tiny").json["versions"] == ["1", "2"]
    assert client.get("/v2/models/tiny/versions/2/ready").json == {"name": "tiny", "ready": True}
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(RED).decode()]}],
               "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}
    two = client.post("/v2/models/tiny/versions/2/infer", json=request)
    assert two.json["model_version"] == "2" and two.json["outputs"][0]["data"][0].endswith(":blue")
    assert two.headers["X-Model-Version"] == f"2 {sha12(files['b'])}"
    default = client.post("/v2/models/tiny/infer", json=request)
    assert default.json["model_version"] == "1" and default.headers["X-Model-Version"] == f"1 {sha12(files['a'])}"
    assert client.post("/v2/models/tiny/versions/7/infer", json=request).status_code == 404


def test_the_png_answer_names_its_version_too(tmp_path, make_app):
    from models.bright import BrightSegmenter

    torch.save(BrightSegmenter().state_dict(), tmp_path / "seg.pth")
    spec = {"name": "regions", "task": "segment", "architecture": "models.bright:BrightSegmenter",
            "checkpoint": str(tmp_path / "seg.pth"), "device": "cpu", "labels": ["dark", "bright"],
            "preprocess": {"resize": 32, "crop": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}}
    answer = make_app(spec).test_client().post("/predictions/regions?format=png", data=RED, content_type="image/png")
    assert answer.mimetype == "image/png" and answer.headers["X-Model-Version"] == f"1 {sha12(tmp_path / 'seg.pth')}"


@pytest.mark.parametrize("change,message", [
    ({"default_version": "3"}, "default_version '3' is not one of the versions ['1', '2']"),
    ({"versions": [{"version": "1", "checkpoint": "a.pth"}, {"version": "1", "checkpoint": "b.pth"}]},
     "versions must be unique, repeated: ['1']"),
    ({"versions": [{"version": "no spaces", "checkpoint": "a.pth"}]}, "field 'versions.0.version'"),
    ({"versions": [{"version": "1", "checkpoint": "a.pth", "device": "cpu"}]}, "field 'versions.0.device'"),
])
def test_bad_versions_are_config_errors_naming_the_model(files, change, message):
    with pytest.raises(ConfigError, match="model 'tiny'") as caught:
        build_config({"models": [{**versioned(files), **change}]})
    assert message in caught.value.message


def test_yaml_version_paths_resolve_against_the_config_file(files, tmp_path):
    import yaml

    from serve.config import load_config

    spec = versioned(files)
    spec["versions"] = [{"version": 1, "checkpoint": "a.pth"}, {"version": 2, "checkpoint": "b.pth", "sha256": "0" * 64}]
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [spec]}))
    model = load_config(tmp_path / "models.yaml", env={}).models[0]
    assert model.checkpoint == files["a"] and model.for_version("2").checkpoint == files["b"]
    assert model.for_version("2").sha256 == "0" * 64 and model.for_version("1").sha256 is None


# --- the lifecycle, in one process -------------------------------------------------------------------


def managed(make_app, files, **server):
    return make_app(versioned(files), enable_management=True, models_dir=str(files["a"].parent), **server)


def error(answer):
    return answer.status_code, answer.json["error"]["code"], answer.json["error"]["message"]


def test_load_set_default_unload_and_rollback(files, make_app):
    client = managed(make_app, files).test_client()
    loaded = client.post("/models/tiny/versions", json={"version": "3", "checkpoint": "c.pth"})
    assert loaded.status_code == 201 and loaded.json["version"] == "3" and loaded.json["default_version"] == "1"
    assert loaded.json["rollout"] == {"generation": 1, "workers": 1, "switched": 1, "failed": 0}
    assert post(client, "/predictions/tiny/3").json["predictions"][0]["label"] == label_for_shift(2)
    assert post(client).headers["X-Model-Version"].startswith("1 ")  # loading doesn't change the default
    made = client.put("/models/tiny/versions/3/set-default")
    assert made.status_code == 200 and made.json["default_version"] == "3"
    assert post(client).headers["X-Model-Version"] == f"3 {sha12(files['c'])}"
    assert client.put("/models/tiny/versions/1/set-default").json["default_version"] == "1"  # rollback
    assert post(client).json["predictions"][0]["label"] == "red"
    unloaded = client.delete("/models/tiny/versions/3")
    assert unloaded.status_code == 200 and [v["version"] for v in unloaded.json["versions"]] == ["1", "2"]
    assert post(client, "/predictions/tiny/3").status_code == 404


def test_load_as_default_in_one_call(files, make_app):
    client = managed(make_app, files).test_client()
    answer = client.post("/models/tiny/versions", json={"version": 3, "checkpoint": str(files["c"]), "default": True})
    assert answer.status_code == 201 and post(client).headers["X-Model-Version"] == f"3 {sha12(files['c'])}"


@pytest.mark.parametrize("body,status,code,message", [
    ({"version": "2", "checkpoint": "c.pth"}, 409, "version_conflict", "model 'tiny' already has version '2'"),
    ({"version": "3", "checkpoint": "../elsewhere.pth"}, 400, "invalid_request", "is outside models_dir"),
    ({"version": "3", "checkpoint": "/etc/passwd"}, 400, "invalid_request", "is outside models_dir"),
    ({"version": "3", "checkpoint": "https://example.com/c.pth"}, 400, "invalid_request", "not a URL"),
    ({"version": "3"}, 400, "invalid_request", "field 'checkpoint': Field required"),
    ({"version": "3", "checkpoint": "c.pth", "sha256": "0" * 64}, 409, "reload_failed",
     "loading version '3' failed: model 'tiny': checkpoint"),
    ({"version": "3", "checkpoint": "missing.pth"}, 409, "reload_failed", "loading version '3' failed"),
    ({"version": "3", "checkpoint": "broken.pth"}, 409, "reload_failed", "loading version '3' failed"),
])
def test_refused_loads_change_nothing(files, make_app, body, status, code, message):
    (files["a"].parent / "broken.pth").write_bytes(b"not a checkpoint")
    client = managed(make_app, files).test_client()
    before = client.get("/models/tiny").json["versions"]
    got = error(client.post("/models/tiny/versions", json=body))
    assert got[:2] == (status, code) and message in got[2]
    assert client.get("/models/tiny").json["versions"] == before


def test_the_default_cant_be_unloaded_and_unknown_versions_are_404(files, make_app):
    client = managed(make_app, files).test_client()
    assert error(client.delete("/models/tiny/versions/1")) == (
        409, "version_conflict", "version '1' is the default of model 'tiny'; set another default first")
    assert error(client.delete("/models/tiny/versions/9"))[:2] == (404, "model_not_found")
    assert error(client.put("/models/tiny/versions/9/set-default"))[:2] == (404, "model_not_found")
    assert error(client.post("/models/nope/versions", json={"version": "3", "checkpoint": "c.pth"}))[:2] == (
        404, "model_not_found")


def test_reload_reads_the_file_again_and_a_request_keeps_the_weights_it_started_with(files, make_app):
    app = managed(make_app, files)
    client = app.test_client()
    before = f"2 {sha12(files['b'])}"
    release = threading.Event()
    batcher = app.extensions["serve"].scheduler.batcher
    batcher.call(release.wait, 10)
    answers = {}
    inflight = threading.Thread(target=lambda: answers.update(old=post(app.test_client(), "/predictions/tiny/2")))
    inflight.start()
    # Its image is queued on version 2's old weights, behind the held call: two items pending.
    wait_until(lambda: batcher.pending == 2, what="the request's image queued behind the held call")
    save(files["b"], 2)  # the file now holds other weights
    reload = threading.Thread(target=lambda: answers.update(reload=client.post("/models/tiny/versions/2/reload")))
    reload.start()
    # The reload's swap is queued behind the image (it runs on the batcher thread too): three pending.
    wait_until(lambda: batcher.pending == 3, what="the reload queued behind the request's image")
    release.set()
    inflight.join(10)
    reload.join(10)
    assert answers["old"].headers["X-Model-Version"] == before and answers["old"].json["predictions"][0]["label"] == "blue"
    assert answers["reload"].status_code == 200
    after = post(client, "/predictions/tiny/2")
    assert after.headers["X-Model-Version"] == f"2 {sha12(files['b'])}" != before
    assert after.json["predictions"][0]["label"] == label_for_shift(2)


def test_reload_of_a_broken_file_keeps_the_old_weights(files, make_app):
    client = managed(make_app, files).test_client()
    files["a"].write_bytes(b"truncated")
    status, code, message = error(client.post("/models/tiny/reload"))
    assert (status, code) == (409, "reload_failed")
    assert message.startswith("reload failed, still serving the previous weights: model 'tiny': checkpoint")
    assert post(client).json["predictions"][0]["label"] == "red"


# --- two workers: two apps sharing a state_dir --------------------------------------------------------


def control(state_dir: Path) -> dict:
    return json.loads((state_dir / "control.json").read_text())


def test_a_change_reaches_the_other_worker_through_the_control_file(files, make_app, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    first, second = (managed(make_app, files, state_dir=str(state)) for _ in range(2))
    answer = first.test_client().post("/models/tiny/versions", json={"version": "3", "checkpoint": "c.pth", "default": True})
    assert answer.status_code == 201
    written = control(state)
    assert written["generation"] == 1 and written["models"]["tiny"]["default"] == "3"
    assert written["models"]["tiny"]["versions"]["3"]["sha256"][:12] == sha12(files["c"])  # pinned for the others
    assert post(second.test_client()).headers["X-Model-Version"].startswith("1 ")  # not yet followed
    second.extensions["serve.lifecycle"].sync()
    assert post(second.test_client()).headers["X-Model-Version"] == f"3 {sha12(files['c'])}"
    # A third worker started now (a respawn) serves the file's state from its first request.
    third = managed(make_app, files, state_dir=str(state))
    assert post(third.test_client()).headers["X-Model-Version"] == f"3 {sha12(files['c'])}"
    # The second worker's own call builds on the first's change.
    assert second.test_client().put("/models/tiny/versions/2/set-default").status_code == 200
    first.extensions["serve.lifecycle"].sync()
    assert post(first.test_client()).headers["X-Model-Version"] == f"2 {sha12(files['b'])}"
    assert control(state)["generation"] == 2


def test_a_worker_that_cant_follow_keeps_its_versions_and_says_why(files, make_app, tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    first, second = (managed(make_app, files, state_dir=str(state)) for _ in range(2))
    assert first.test_client().post("/models/tiny/versions", json={"version": "3", "checkpoint": "c.pth",
                                                                   "default": True}).status_code == 201
    save(files["c"], 0)  # changed before the second worker read it: its sha256 no longer matches
    with caplog.at_level(logging.ERROR, logger="serve.lifecycle"):
        second.extensions["serve.lifecycle"].sync()
    client = second.test_client()
    assert post(client).headers["X-Model-Version"] == f"1 {sha12(files['a'])}"
    assert [v["version"] for v in client.get("/models/tiny").json["versions"]] == ["1", "2"]
    assert "generation 1: model 'tiny'" in caplog.text and "still serving versions ['1', '2'] (default 1)" in caplog.text
    assert metric(client.get("/metrics").data.decode(), "serve_lifecycle_failures_total", model="tiny") == 1


def test_a_failed_change_writes_nothing(files, make_app, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    client = managed(make_app, files, state_dir=str(state)).test_client()
    assert client.put("/models/tiny/versions/2/set-default").status_code == 200
    written = (state / "control.json").read_bytes()
    assert client.post("/models/tiny/versions", json={"version": "3", "checkpoint": "missing.pth"}).status_code == 409
    assert (state / "control.json").read_bytes() == written


# --- keys and scopes ------------------------------------------------------------------------------------

KEYS = {"web": "web-page-key-0000000000001", "ops": "ops-key-000000000000000002"}


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/models/tiny/versions", {"version": "3", "checkpoint": "c.pth"}),
    ("PUT", "/models/tiny/versions/2/set-default", None),
    ("DELETE", "/models/tiny/versions/2", None),
    ("POST", "/models/tiny/versions/2/reload", None),
    ("POST", "/models/tiny/reload", None),
])
def test_lifecycle_routes_need_the_management_scope(files, make_app, tmp_path, method, path, body):
    keys = tmp_path / "keys.yaml"
    keys.write_text(json.dumps({"web": {"key": KEYS["web"], "scopes": ["inference"]},
                                "ops": {"key": KEYS["ops"], "scopes": ["inference", "management"]}}))
    client = managed(make_app, files, api_keys_file=str(keys)).test_client()
    options = {"json": body} if body is not None else {}
    assert client.open(path, method=method, **options).status_code == 401
    assert client.open(path, method=method, headers={"X-API-Key": KEYS["web"]}, **options).status_code == 403
    assert client.open(path, method=method, headers={"X-API-Key": KEYS["ops"]}, **options).status_code in (200, 201)
    assert client.get("/models/tiny/versions/1", headers={"X-API-Key": KEYS["web"]}).status_code == 200


def test_lifecycle_routes_are_off_by_default(files, make_app):
    client = make_app(versioned(files)).test_client()
    assert client.post("/models/tiny/versions", json={"version": "3", "checkpoint": "c.pth"}).status_code == 404
    assert client.put("/models/tiny/versions/2/set-default").status_code == 404
    assert client.delete("/models/tiny/versions/2").status_code == 405  # the path is a version's metadata


def test_a_state_dir_that_cant_be_written_stops_start_up(files, make_app, tmp_path):
    with pytest.raises(ConfigError, match="field 'state_dir': .*missing is not a writable directory"):
        managed(make_app, files, state_dir=str(tmp_path / "missing"))


def test_a_broken_control_file_is_reported_once_and_changes_nothing(files, make_app, tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    app = managed(make_app, files, state_dir=str(state))
    (state / "control.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="serve.lifecycle"):
        app.extensions["serve.lifecycle"].sync()
        app.extensions["serve.lifecycle"].sync()
    assert caplog.text.count("is unreadable") == 1 and "still serving generation 0" in caplog.text
    client = app.test_client()
    assert post(client).headers["X-Model-Version"] == f"1 {sha12(files['a'])}"
    status, code, message = error(client.put("/models/tiny/versions/2/set-default"))
    assert (status, code) == (409, "reload_failed") and "control file" in message and "nothing changed" in message
