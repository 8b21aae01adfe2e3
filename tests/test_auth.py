"""API keys (serve/auth.py): scopes per route, both headers, 401/403 in each API's shape, open probes,
rotation by rewriting the key file, secrets kept out of logs and messages; in the app and under gunicorn."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import pytest
import requests
import yaml
from conftest import image_bytes, metric, tiny_model_config, write_config
from flask import jsonify
from servers import Server

from serve.auth import ROUTE_SCOPES, SCOPES, exposure_warning, parse_keys, required_scope
from serve.config import ServerSettings, build_config
from serve.errors import ConfigError

# name -> (key, scopes); "prom" is written to the file as its sha256 only.
KEYS = {
    "web": ("web-page-key-0000000000001", ["inference"]),
    "ops": ("ops-key-000000000000000002", ["inference", "management", "metrics"]),
    "prom": ("prometheus-key-00000000003", ["metrics"]),
}


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_document(keys: dict[str, tuple[str, list[str]]] = KEYS) -> str:
    return yaml.safe_dump({
        name: ({"key_sha256": sha256(key)} if name == "prom" else {"key": key}) | {"scopes": scopes}
        for name, (key, scopes) in keys.items()
    }, sort_keys=False)


def replace_file(path: Path, text: str) -> None:
    """Write a new file and rename it over the old one, as a Kubernetes Secret update does."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def auth(name: str | None, header: str = "bearer") -> dict[str, str]:
    if name is None:
        return {}
    key = KEYS[name][0]
    return {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}


@pytest.fixture
def keys_file(tmp_path) -> Path:
    path = tmp_path / "api-keys.yaml"
    path.write_text(keys_document())
    return path


@pytest.fixture
def client(make_app, keys_file):
    return make_app(api_keys_file=str(keys_file), enable_management=True).test_client()


V2_IMAGE = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(image_bytes()).decode()]}]}
# (method, path, request options, scope); None = open to anyone.
ROUTES = [
    ("GET", "/ping", {}, None),
    ("GET", "/ready", {}, None),
    ("GET", "/v2/health/live", {}, None),
    ("GET", "/v2/health/ready", {}, None),
    ("GET", "/", {}, None),
    ("GET", "/ui/app.js", {}, None),
    ("GET", "/ui/style.css", {}, None),
    ("GET", "/models", {}, "inference"),
    ("GET", "/models/tiny", {}, "inference"),
    ("GET", "/openapi.json", {}, "inference"),
    ("POST", "/predictions/tiny", {"data": image_bytes(), "content_type": "image/png"}, "inference"),
    ("PUT", "/predictions", {"data": image_bytes(), "content_type": "image/png"}, "inference"),
    ("GET", "/v2", {}, "inference"),
    ("GET", "/v2/models/tiny", {}, "inference"),
    ("GET", "/v2/models/tiny/versions/1/ready", {}, "inference"),
    ("POST", "/v2/models/tiny/infer", {"json": V2_IMAGE}, "inference"),
    ("GET", "/metrics", {}, "metrics"),
    ("POST", "/models/tiny/reload", {}, "management"),
]


@pytest.mark.parametrize("who", [None, "web", "prom", "ops"])
@pytest.mark.parametrize("method,path,options,scope", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_each_route_needs_its_scope(client, method, path, options, scope, who):
    answer = client.open(path, method=method, headers=auth(who), **options)
    if scope is None or (who is not None and scope in KEYS[who][1]):
        assert answer.status_code == 200, answer.data
    else:
        assert answer.status_code == (401 if who is None else 403), answer.data


@pytest.mark.parametrize("header", ["bearer", "x-api-key"])
def test_both_headers_carry_a_key(client, header):
    answer = client.post("/predictions/tiny", data=image_bytes(), content_type="image/png", headers=auth("web", header))
    assert answer.status_code == 200 and answer.json["model"] == "tiny"


@pytest.mark.parametrize("headers", [
    {"Authorization": f"bearer {KEYS['web'][0]}"},        # the scheme is case-insensitive
    {"Authorization": f"Bearer   {KEYS['web'][0]}  "},
    {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": KEYS["web"][0]},  # another scheme: X-API-Key counts
])
def test_header_variants_accepted(client, headers):
    assert client.get("/models", headers=headers).status_code == 200


def test_401_without_a_key_in_the_server_shape(client):
    answer = client.get("/models")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="torch-serve"'
    assert answer.json == {"error": {"code": "unauthorized", "message":
                                     "this route needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"}}


@pytest.mark.parametrize("headers", [
    {"X-API-Key": "not-a-key-at-all-000000000"},
    {"Authorization": f"Bearer {KEYS['web'][0]}x"},
    {"Authorization": f"Bearer {sha256(KEYS['prom'][0])}"},  # the digest in the file is not the key
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer"},
])
def test_401_for_an_unknown_key(client, headers):
    answer = client.get("/models", headers=headers)
    assert answer.status_code == 401 and answer.json["error"]["code"] == "unauthorized"
    assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="torch-serve"')
    for value in headers.values():
        token = value.split()[-1]
        assert token == "Bearer" or token not in answer.get_data(as_text=True)


def test_403_names_the_key_and_the_scope(client):
    answer = client.post("/models/tiny/reload", headers=auth("web", "x-api-key"))
    assert answer.status_code == 403
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="torch-serve", error="insufficient_scope", scope="management"'
    assert answer.json == {"error": {"code": "forbidden",
                                     "message": "the API key 'web' lacks the 'management' scope this route needs"}}


def test_v2_routes_answer_in_the_v2_shape(client):
    missing = client.post("/v2/models/tiny/infer", json=V2_IMAGE)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == 'Bearer realm="torch-serve"'
    assert set(missing.json) == {"error"} and "needs an API key" in missing.json["error"]
    forbidden = client.get("/v2/models/tiny", headers=auth("prom"))
    assert forbidden.status_code == 403 and "insufficient_scope" in forbidden.headers["WWW-Authenticate"]
    assert forbidden.json == {"error": "the API key 'prom' lacks the 'inference' scope this route needs"}
    answered = client.post("/v2/models/tiny/infer", json=V2_IMAGE, headers=auth("web"))
    assert answered.status_code == 200 and answered.json["outputs"][0]["name"] == "probabilities"


def test_unknown_paths_need_a_key_before_they_say_404(client):
    assert client.get("/no/such/route").status_code == 401
    assert client.get("/no/such/route", headers=auth("prom")).status_code == 404
    assert client.get("/predictions/tiny", headers=auth("web")).status_code == 405  # wrong method, valid key
    assert client.get("/v2/no/such", headers=auth("web")).json == {"error": "no route GET /v2/no/such"}


def test_every_route_is_classified_explicitly(make_app, keys_file):
    app = make_app(api_keys_file=str(keys_file), enable_management=True)
    for rule in app.url_map.iter_rules():
        blueprint = rule.endpoint.rpartition(".")[0]
        assert rule.endpoint in ROUTE_SCOPES or blueprint in ROUTE_SCOPES, f"{rule.rule} ({rule.endpoint}) has no scope"
    assert set(ROUTE_SCOPES.values()) <= {None, *SCOPES}


def test_a_route_nobody_classified_needs_the_management_scope(make_app, keys_file):
    app = make_app(api_keys_file=str(keys_file))
    app.add_url_rule("/extra", "extra", lambda: jsonify(ok=True))
    assert required_scope("extra") == required_scope("newblueprint.view") == "management"
    client = app.test_client()
    assert client.get("/extra").status_code == 401
    assert client.get("/extra", headers=auth("web")).status_code == 403
    assert client.get("/extra", headers=auth("ops")).json == {"ok": True}


def test_keys_off_by_default(client, make_app):
    open_client = make_app().test_client()
    assert open_client.get("/models").status_code == 200
    assert open_client.get("/metrics").status_code == 200


@pytest.mark.parametrize("how", ["replace", "in place"])
def test_rotation_by_rewriting_the_file(client, keys_file, caplog, how):
    assert client.get("/models", headers=auth("web")).status_code == 200
    new_key = "rotated-web-key-000000000004"
    rotated = {"web2": (new_key, ["inference"]), "ops": KEYS["ops"]}
    with caplog.at_level(logging.INFO, logger="serve.auth"):
        if how == "replace":
            replace_file(keys_file, keys_document(rotated))
        else:
            keys_file.write_text(keys_document(rotated))
        assert client.get("/models", headers=auth("web")).status_code == 401
    assert client.get("/models", headers={"X-API-Key": new_key}).status_code == 200
    assert client.get("/metrics", headers=auth("ops")).status_code == 200
    assert [r.getMessage() for r in caplog.records] == [f"API keys reloaded from {keys_file}: web2, ops"]


@pytest.mark.parametrize("broken,reason", [
    ("web: [unclosed\n", "is not valid YAML or JSON (line 2, column 1)"),
    ("web:\n  key: short\n  scopes: [inference]\n", "key 'web': field 'key': String should have at least 16 characters"),
    ("web:\n  key: web-page-key-0000000000009\n  scopes: [admin]\n", "key 'web': field 'scopes.0': Input should be"),
    ("{}\n", "holds no keys"),
    (b"\xff\xfe", "is not UTF-8 text"),
    (None, "cannot read API keys file"),
])
def test_a_broken_new_file_keeps_the_old_keys(client, keys_file, caplog, broken, reason):
    with caplog.at_level(logging.INFO, logger="serve.auth"):
        if broken is None:
            keys_file.unlink()
        elif isinstance(broken, bytes):
            keys_file.write_bytes(broken)
        else:
            replace_file(keys_file, broken)
        for _ in range(3):  # logged once per change, not per request
            assert client.get("/models", headers=auth("web")).status_code == 200
        assert client.get("/models").status_code == 401
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    assert reason in errors[0].getMessage() and "keeping the 3 keys read before (web, ops, prom)" in errors[0].getMessage()
    # Fixed again: the new file is read.
    replace_file(keys_file, keys_document({"web": ("web-page-key-fixed-0000005", ["inference"])}))
    assert client.get("/models", headers=auth("web")).status_code == 401
    assert client.get("/models", headers={"X-API-Key": "web-page-key-fixed-0000005"}).status_code == 200


def test_keys_never_reach_a_log_line(client, keys_file, caplog):
    wrong = "wrong-key-but-secret-000000006"
    with caplog.at_level(logging.DEBUG):
        client.get("/models", headers=auth("web"))
        client.get("/models", headers={"X-API-Key": wrong})
        client.get("/metrics", headers=auth("web", "x-api-key"))
        client.post("/models/tiny/reload", headers=auth("ops"))
        replace_file(keys_file, "web:\n  key: " + KEYS["web"][0] + "\n  scopes: [nope]\n")
        client.get("/models", headers=auth("ops"))
        replace_file(keys_file, keys_document())
        client.get("/models", headers=auth("ops"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "API keys reloaded" in text and "keeping the 3 keys" in text  # the rotations were logged
    for secret in [key for key, _ in KEYS.values()] + [sha256(k) for k, _ in KEYS.values()] + [wrong]:
        assert secret not in text
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "serve.access"]
    assert [(line["path"], line["status"], line["key"]) for line in access] == [
        ("/models", 200, "web"), ("/models", 401, None), ("/metrics", 403, None),
        ("/models/tiny/reload", 200, "ops"), ("/models", 200, "ops"), ("/models", 200, "ops"),
    ]


def test_refused_requests_are_counted_as_errors(client):
    for _ in range(2):
        client.post("/predictions/tiny", data=image_bytes(), content_type="image/png")
    client.get("/metrics", headers=auth("web"))
    text = client.get("/metrics", headers=auth("prom")).get_data(as_text=True)
    assert metric(text, "serve_errors_total", code="unauthorized") == 2
    assert metric(text, "serve_errors_total", code="forbidden") == 1
    assert metric(text, "serve_requests_total", model="tiny", status="401") == 2


@pytest.mark.parametrize("document,expected", [
    ({"a": {"key": "k" * 16, "key_sha256": "0" * 64, "scopes": ["inference"]}}, "give exactly one of 'key' and 'key_sha256'"),
    ({"a": {"key": "secret-but-has space", "scopes": ["inference"]}}, "field 'key': String should match pattern"),
    ({"a": {"key": "secret-value-0000000001", "scopes": []}}, "field 'scopes': Tuple should have at least 1 item"),
    ({"a": {"key": "secret-value-0000000001", "scopes": ["inference"], "extra": "x"}}, "field 'extra': Extra inputs"),
    ({"a": {"key_sha256": "abc", "scopes": ["inference"]}}, "field 'key_sha256': String should match pattern"),
    ({"a": {"key": "secret-value-0000000001", "scopes": ["inference"]},
      "b": {"key_sha256": sha256("secret-value-0000000001"), "scopes": ["metrics"]}}, "keys 'a' and 'b' are the same key"),
    ({"bad name": {"key": "secret-value-0000000001", "scopes": ["inference"]}}, "key names are"),
    (["secret-value-0000000001"], "must map key names to"),
])
def test_bad_key_documents_are_named_without_their_keys(document, expected):
    with pytest.raises(ConfigError) as caught:
        parse_keys(json.dumps(document), "SERVE_API_KEYS")
    assert caught.value.message.startswith("SERVE_API_KEYS") and expected in caught.value.message
    assert "secret" not in caught.value.message


def test_keys_from_the_environment_stay_out_of_the_config(make_app, tiny_checkpoint):
    document = json.dumps({"ci": {"key": "env-key-0000000000000007", "scopes": ["inference"]}})
    config = build_config({"models": [tiny_model_config(tiny_checkpoint)]}, env={"SERVE_API_KEYS": document})
    assert "env-key" not in repr(config) and "env-key" not in config.model_dump_json()
    app = make_app(api_keys=document)
    assert app.test_client().get("/models", headers={"X-API-Key": "env-key-0000000000000007"}).status_code == 200
    # A value of the wrong type is refused without being echoed.
    with pytest.raises(ConfigError) as caught:
        build_config({"models": [tiny_model_config(tiny_checkpoint)],
                      "server": {"api_keys": {"ci": {"key": "yaml-key-000000000000008"}}}})
    assert "field 'api_keys'" in caught.value.message and "yaml-key" not in caught.value.message
    with pytest.raises(ConfigError) as caught:
        build_config({"models": [tiny_model_config(tiny_checkpoint)]},
                     env={"SERVE_API_KEYS": document, "SERVE_API_KEYS_FILE": "/etc/keys.yaml"})
    assert "not both" in caught.value.message and "env-key" not in caught.value.message


def test_a_bad_keys_file_stops_start_up(make_app, tmp_path):
    with pytest.raises(ConfigError, match="cannot read API keys file .*missing.yaml: No such file"):
        make_app(api_keys_file=str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("web:\n  key: web-page-key-0000000000001\n")
    with pytest.raises(ConfigError, match="key 'web': field 'scopes': Field required"):
        make_app(api_keys_file=str(tmp_path / "bad.yaml"))


def test_a_relative_keys_file_is_relative_to_the_config_file(tmp_path, tiny_checkpoint):
    (tmp_path / "conf").mkdir()
    config = write_config(tmp_path / "conf", [tiny_model_config(tiny_checkpoint)], api_keys_file="keys/api.yaml")
    from serve.config import load_config

    assert load_config(config, env={}).server.api_keys_file == tmp_path / "conf" / "keys" / "api.yaml"
    env = {"SERVE_API_KEYS_FILE": "relative.yaml"}
    assert load_config(config, env=env).server.api_keys_file == Path("relative.yaml")


@pytest.mark.parametrize("hosts,management,keys,exposed", [
    (["0.0.0.0"], False, False, True),
    (["::"], True, False, True),
    (["10.1.2.3", "127.0.0.1"], False, False, True),
    (["127.0.0.1"], True, False, False),
    (["::1", "localhost", "127.0.0.2"], False, False, False),
    (["0.0.0.0"], True, True, False),
])
def test_warning_for_a_non_loopback_bind_without_keys(hosts, management, keys, exposed):
    settings = ServerSettings(enable_management=management, api_keys_file="/k.yaml" if keys else None)
    warning = exposure_warning(settings, hosts)
    if not exposed:
        assert warning is None
        return
    assert warning.startswith(f"listening on {', '.join(sorted(h for h in hosts if h != '127.0.0.1'))} without API keys")
    assert "run predictions" in warning and "/metrics" in warning and "SERVE_API_KEYS_FILE" in warning
    assert ("reload models" in warning) == management


# --- end to end: a real gunicorn, 2 workers ---------------------------------------------------------


@pytest.mark.server
def test_keys_and_rotation_under_gunicorn(tmp_path, tiny_checkpoint):
    keys_file = tmp_path / "api-keys.yaml"
    keys_file.write_text(keys_document())
    config = write_config(tmp_path, [tiny_model_config(tiny_checkpoint)])
    log = tmp_path / "gunicorn.log"
    server = Server({"SERVE_CONFIG": str(config), "WEB_CONCURRENCY": "2", "SERVE_API_KEYS_FILE": str(keys_file)}, log)
    try:
        url = f"{server.url}/predictions/tiny"
        png = {"data": image_bytes(), "headers": {"Content-Type": "image/png"}, "timeout": 10}
        assert requests.post(url, **png).status_code == 401
        answer = requests.post(url, **{**png, "headers": {**png["headers"], **auth("web")}})
        assert answer.status_code == 200 and answer.json()["model"] == "tiny"
        assert requests.get(f"{server.url}/metrics", headers=auth("web", "x-api-key"), timeout=5).status_code == 403
        assert requests.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200

        new_key = "rotated-under-gunicorn-00009"
        replace_file(keys_file, keys_document({"web2": (new_key, ["inference"])}))
        # Every worker reads the new file on its next request: new connections until both have answered.
        reloaded: set[str] = set()
        for _ in range(200):
            with requests.Session() as session:
                assert session.get(f"{server.url}/models", headers=auth("web"), timeout=5).status_code == 401
                assert session.get(f"{server.url}/models", headers={"X-API-Key": new_key}, timeout=5).status_code == 200
            reloaded = set(re.findall(r"\[(\d+)\] \[INFO\] serve.auth: API keys reloaded", log.read_text()))
            if len(reloaded) == 2:
                break
        assert len(reloaded) == 2, log.read_text()[-2000:]
    finally:
        assert server.stop() == 0
    text = log.read_text()
    for key, _ in KEYS.values():
        assert key not in text
    assert new_key not in text
