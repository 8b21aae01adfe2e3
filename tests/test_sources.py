"""Remote checkpoint sources (serve/sources/) against real servers on 127.0.0.1: an HTTPS file server
with a certificate made here, moto's S3 server, and a Hugging Face Hub file API; nothing from outside."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from certs import TestCA
from conftest import image_bytes, tiny_model_config, tiny_net, write_config

from serve.app import create_app
from serve.cli import main
from serve.config import ModelSpec, build_config
from serve.errors import CheckpointError, ConfigError
from serve.sources.address import parse_source
from serve.sources.allow import check_allowed


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_bytes(scale: float = 1.0) -> bytes:
    net = tiny_net()
    with torch.no_grad():
        net.fc.weight.mul_(scale)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getvalue()


Route = Callable[[str, str], "tuple[int, dict[str, str], bytes] | None"]


class FileServer:
    """A threaded HTTP(S) server on 127.0.0.1: `files` by URL path, or `route(method, path)`; Range
    answered with 206 unless ignore_range; a path in `cut` is closed half-way through its first GET.
    Every request is recorded (method, path, Range header). It stops when the test's fixture ends."""

    def __init__(self, files: dict[str, bytes] | None = None, tls=None, route: Route | None = None,
                 ignore_range: bool = False):
        self.files = dict(files or {})
        self.route = route
        self.ignore_range = ignore_range
        self.cut: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                outer.answer(self, "HEAD")

            def do_GET(self):
                outer.answer(self, "GET")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert, tls.key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def answer(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path
        self.requests.append((method, path, handler.headers.get("Range")))
        routed = self.route(method, path) if self.route else None
        if routed is None and path in self.files:
            routed = (200, {}, self.files[path])
        if routed is None:
            routed = (404, {}, b"not found")
        status, headers, body = routed
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if ranged and status == 200 and not self.ignore_range:
            start = int(ranged.group(1))
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", headers.get("Content-Length", str(len(body) - start)))
        handler.end_headers()
        if method == "HEAD":
            return
        if path in self.cut:
            self.cut.discard(path)
            handler.wfile.write(body[start:start + (len(body) - start) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(body[start:])

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def serve_files():
    started = []

    def start(*args, **kwargs) -> FileServer:
        started.append(FileServer(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def ca(tmp_path):
    ca = TestCA(tmp_path)
    return ca, ca.issue("files")


def predicted_label(config) -> str:
    app = create_app(config)
    try:
        answer = app.test_client().post("/predictions/tiny", data={"image": (io.BytesIO(image_bytes((0, 0, 255))), "x.png")})
        assert answer.status_code == 200, answer.json
        return answer.json["predictions"][0]["label"]
    finally:
        app.extensions["serve"].close()


def cache_files(cache: Path) -> list[str]:
    """Every file in the cache, but the lock files (left on purpose: flock needs a file)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and p.parent.name != "locks")


# --- allowed_sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source, entry, allowed", [
    ("s3://models/resnet/a.pth", "s3://models/", True),
    ("s3://models/resnet/a.pth", "s3://models", True),
    ("s3://models-evil/a.pth", "s3://models", False),
    ("s3://models/resnet/a.pth", "s3://models/res", False),  # a prefix ends at a '/'
    ("s3://models/resnet/a.pth", "s3://models/resnet/*.pth", True),
    ("s3://models/resnet/x/a.pth", "s3://models/resnet/*.pth", False),  # '*' stays in its segment
    ("s3://models/resnet/x/a.pth", "s3://models/**.pth", True),
    ("hf://org/net@v1/m.pth", "hf://org", True),
    ("hf://org/net@v1/m.pth", "hf://org/net@v2", False),
    ("hf://org/net/m.pth", "hf://org/net@v1", False),  # a pinned revision: the source must name it
    ("hf://org-evil/net", "hf://org", False),
    ("https://a.example.com/w/m.pth", "https://*.example.com/w/", True),
    ("https://example.com.evil.net/w/m.pth", "https://*.example.com/w/", False),
    ("https://evil.net/w/m.pth?h=.example.com/w/", "https://*.example.com/w/", False),  # the query is not matched
    ("https://a.example.com:8443/w/m.pth", "https://*.example.com/w/", False),  # a port must be named
    ("https://a.example.com/w/m.pth", "s3://a.example.com/w/", False),
])
def test_allowed_sources_match_scheme_authority_and_path_each_on_their_own(source, entry, allowed):
    address = parse_source(source)
    if allowed:
        check_allowed(address, [entry])
    else:
        with pytest.raises(ConfigError, match="is not in allowed_sources"):
            check_allowed(address, [entry])


@pytest.mark.parametrize("source, message", [
    ("ftp://host/x.pth", "scheme 'ftp' is not a checkpoint source"),
    ("https://user:pw@host/x.pth", "credentials in the URL are not accepted"),
    ("hf://org", "is not hf://org/repo"),
    ("hf://org/repo/../x", "'..'"),
    ("s3://bucket", "is not s3://bucket/key"),
])
def test_malformed_sources_are_refused_saying_the_expected_form(source, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_source(source)


def test_allowed_sources_entries_are_validated_and_read_from_the_environment():
    config = build_config({"models": [tiny_model_config(Path("x.pth"))]},
                          env={"SERVE_ALLOWED_SOURCES": "s3://models/, hf://my-org/*"})
    assert config.server.allowed_sources == ("s3://models/", "hf://my-org/*")
    with pytest.raises(ConfigError, match="allowed_sources entry 'ftp://x' is not"):
        build_config({"models": [tiny_model_config(Path("x.pth"))], "server": {"allowed_sources": ["ftp://x"]}})


def test_a_spec_never_holds_a_remote_string():
    with pytest.raises(ValueError, match="is a remote source: build_config / load_config fetch it"):
        ModelSpec(name="m", checkpoint="s3://bucket/key.pth")


# --- https:// --------------------------------------------------------------------------------------------


def https_config(server: FileServer, ca_cert: Path, cache: Path, path: str, digest: str | None, **server_fields):
    model = tiny_model_config(f"{server.base}{path}")
    if digest is not None:
        model["sha256"] = digest
    settings = {"allowed_sources": [f"https://127.0.0.1:{server.port}/weights/"], "source_ca_file": str(ca_cert),
                "source_cache_dir": str(cache), **server_fields}
    return build_config({"models": [model], "server": settings})


def test_https_source_is_fetched_once_into_the_cache_and_served(serve_files, ca, tmp_path):
    data = tiny_bytes()
    server = serve_files({"/weights/tiny.pth": data}, tls=ca[1])
    cache = tmp_path / "cache"
    config = https_config(server, ca[0].cert, cache, "/weights/tiny.pth", sha(data))
    local = config.models[0].checkpoint
    assert local == cache / "entries" / sha(data) / "tiny.pth" and local.read_bytes() == data
    assert predicted_label(config) == "blue"
    assert https_config(server, ca[0].cert, cache, "/weights/tiny.pth", sha(data)).models[0].checkpoint == local
    assert len(server.requests) == 1  # the second build found it by its sha256: no request
    assert cache_files(cache) == [f"entries/{sha(data)}/tiny.pth"]  # no partial file left


def test_https_source_without_sha256_is_refused_before_connecting(serve_files, ca, tmp_path):
    server = serve_files({"/weights/tiny.pth": tiny_bytes()}, tls=ca[1])
    with pytest.raises(ConfigError) as caught:
        https_config(server, ca[0].cert, tmp_path / "cache", "/weights/tiny.pth", None)
    assert caught.value.message == (f"model 'tiny': field 'checkpoint': '{server.base}/weights/tiny.pth': https "
                                    "sources must carry sha256 (the file's digest, e.g. from sha256sum)")
    assert server.requests == []


def test_a_wrong_sha256_is_refused_and_nothing_is_left_in_the_cache(serve_files, ca, tmp_path):
    data = tiny_bytes()
    server = serve_files({"/weights/tiny.pth": data}, tls=ca[1])
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=f"sha256 is {sha(data)}, the config expects {'0' * 64}; nothing was cached"):
        https_config(server, ca[0].cert, cache, "/weights/tiny.pth", "0" * 64)
    assert len(server.gets()) == 1 and cache_files(cache) == []


@pytest.mark.parametrize("allowed, listed", [
    ([], "empty: remote sources are off"),
    (["https://127.0.0.1:1/weights/"], "allowed: ['https://127.0.0.1:1/weights/']"),
])
def test_a_source_outside_allowed_sources_is_refused_without_a_connection(serve_files, ca, tmp_path, allowed, listed):
    data = tiny_bytes()
    server = serve_files({"/weights/tiny.pth": data}, tls=ca[1])
    with pytest.raises(ConfigError) as caught:
        https_config(server, ca[0].cert, tmp_path / "cache", "/weights/tiny.pth", sha(data), allowed_sources=allowed)
    assert caught.value.message == (f"model 'tiny': field 'checkpoint': '{server.base}/weights/tiny.pth' is not in "
                                    f"allowed_sources ({listed})")
    assert server.requests == []


@pytest.mark.parametrize("ignore_range", [False, True])
def test_a_download_cut_half_way_is_resumed_or_restarted(serve_files, ca, tmp_path, ignore_range):
    data = tiny_bytes()
    server = serve_files({"/weights/tiny.pth": data}, tls=ca[1], ignore_range=ignore_range)
    server.cut.add("/weights/tiny.pth")
    config = https_config(server, ca[0].cert, tmp_path / "cache", "/weights/tiny.pth", sha(data))
    assert config.models[0].checkpoint.read_bytes() == data
    first, second = server.gets()
    assert first[2] is None and second[2] == f"bytes={len(data) // 2}-"  # resumed where the cut left it
    assert cache_files(tmp_path / "cache") == [f"entries/{sha(data)}/tiny.pth"]


def test_an_untrusted_certificate_is_refused_with_the_setting_that_fixes_it(serve_files, ca, tmp_path):
    data = tiny_bytes()
    server = serve_files({"/weights/tiny.pth": data}, tls=ca[1])
    other_ca = TestCA(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path, "other CA")
    with pytest.raises(ConfigError, match="is not trusted .*source_ca_file names the CA bundle"):
        https_config(server, other_ca.cert, tmp_path / "cache", "/weights/tiny.pth", sha(data))


def test_offline_serves_from_the_cache_only(serve_files, ca, tmp_path):
    data = tiny_bytes()
    server = serve_files({"/weights/tiny.pth": data}, tls=ca[1])
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="offline, and its sha256 .* is not in the source cache"):
        https_config(server, ca[0].cert, cache, "/weights/tiny.pth", sha(data), offline=True)
    https_config(server, ca[0].cert, cache, "/weights/tiny.pth", sha(data))  # fills the cache
    requests = len(server.requests)
    config = https_config(server, ca[0].cert, cache, "/weights/tiny.pth", sha(data), offline=True)
    assert config.models[0].checkpoint.read_bytes() == data and len(server.requests) == requests == 1


def test_the_size_cap_refuses_what_cant_fit_and_evicts_the_least_recently_used(serve_files, ca, tmp_path):
    one, two = tiny_bytes(1.0), tiny_bytes(0.5)
    server = serve_files({"/weights/one.pth": one, "/weights/two.pth": two}, tls=ca[1])
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=f"is {len(one)} bytes, more than source_cache_max_bytes \\(100\\)"):
        https_config(server, ca[0].cert, cache, "/weights/one.pth", sha(one), source_cache_max_bytes=100)
    cap = len(one) + len(two) // 2  # room for one of them
    assert build_config({"models": [tiny_model_config(Path("x.pth"))], "server": {"source_cache_max_bytes": "2KiB"}}).server.source_cache_max_bytes == 2048
    https_config(server, ca[0].cert, cache, "/weights/one.pth", sha(one), source_cache_max_bytes=cap)
    https_config(server, ca[0].cert, cache, "/weights/two.pth", sha(two), source_cache_max_bytes=cap)
    assert cache_files(cache) == [f"entries/{sha(two)}/two.pth"]


def test_a_fetched_pickle_is_refused_as_a_local_one_is(serve_files, ca, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"state_dict": Payload()}, buffer)
    data = buffer.getvalue()
    server = serve_files({"/weights/evil.pth": data}, tls=ca[1])
    config = https_config(server, ca[0].cert, tmp_path / "cache", "/weights/evil.pth", sha(data))
    with pytest.raises(CheckpointError, match="holds pickled Python objects .* refused"):
        create_app(config)
    assert not marker.exists()


def test_inspect_takes_a_remote_source(serve_files, ca, tmp_path, capsys):
    data = tiny_bytes()
    server = serve_files({"/weights/tiny.pth": data}, tls=ca[1])
    settings = write_config(tmp_path, [tiny_model_config(Path("x.pth"))], source_cache_dir=str(tmp_path / "cache"),
                            allowed_sources=[f"{server.base}/weights/"], source_ca_file=str(ca[0].cert))
    url = f"{server.base}/weights/tiny.pth"
    assert main(["inspect", url, "--settings", str(settings)]) == 1
    assert "https sources must carry sha256" in capsys.readouterr().err
    assert main(["inspect", url, "--sha256", sha(data), "--settings", str(settings)]) == 0
    out = capsys.readouterr().out
    assert f"sha256:  {sha(data)}" in out and "fc.weight" in out


# --- s3:// (moto's S3 server: the real S3 HTTP API, credentials checked) ---------------------------------


class S3:
    """moto's ThreadedMotoServer on 127.0.0.1 with a bucket, and an IAM user whose key may read it.
    Authentication is on once the fixture has set things up: a wrong key is refused as AWS would."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        iam = self.client("iam", "setup", "setup")
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.client("s3", "setup", "setup").create_bucket(Bucket="models")
        self._auth(0)

    def client(self, service: str, key_id: str | None = None, secret: str | None = None):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key_id or self.key_id, aws_secret_access_key=secret or self.secret)

    def put(self, key: str, data: bytes) -> None:
        self.client("s3").put_object(Bucket="models", Key=key, Body=data)

    def _auth(self, free_actions: float) -> None:
        import requests

        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=str(free_actions).encode(), timeout=10).raise_for_status()

    def stop(self) -> None:
        self._auth(float("inf"))
        self.server.stop()


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto.server", reason="moto[server] (requirements-dev.txt) runs the S3 server")
    server = S3()
    yield server
    server.stop()


def s3_config(s3: S3, cache: Path, key: str, digest: str | None = None, secret: str | None = None, **server_fields):
    model = tiny_model_config(f"s3://models/{key}")
    if digest is not None:
        model["sha256"] = digest
    settings = {"allowed_sources": ["s3://models/"], "source_cache_dir": str(cache), "s3_endpoint_url": s3.endpoint,
                "s3_region": "us-east-1", "s3_access_key_id": s3.key_id,
                "s3_secret_access_key": secret or s3.secret, **server_fields}
    return build_config({"models": [model], "server": settings})


def test_s3_source_is_served_and_found_again_by_its_etag(s3, tmp_path):
    data = tiny_bytes()
    s3.put("served/tiny.pth", data)
    cache = tmp_path / "cache"
    config = s3_config(s3, cache, "served/tiny.pth")
    assert config.models[0].checkpoint == cache / "entries" / sha(data) / "tiny.pth"
    assert predicted_label(config) == "blue"
    assert s3_config(s3, cache, "served/tiny.pth").models[0].checkpoint == config.models[0].checkpoint
    offline = s3_config(s3, cache, "served/tiny.pth", offline=True, s3_endpoint_url="http://127.0.0.1:1")
    assert offline.models[0].checkpoint == config.models[0].checkpoint  # nothing connected to


def test_s3_wrong_credentials_are_refused_with_a_clear_message(s3, tmp_path):
    s3.put("secret/tiny.pth", tiny_bytes())
    with pytest.raises(ConfigError) as caught:
        s3_config(s3, tmp_path / "cache", "secret/tiny.pth", secret="wrong" * 8)
    assert caught.value.message.startswith(
        "model 'tiny': field 'checkpoint': 's3://models/secret/tiny.pth': S3 refused access (")
    assert "wrong credentials, or they may not read this object; the credentials come from server.s3_access_key_id" \
        in caught.value.message
    assert "wrong" * 8 not in caught.value.message
    assert cache_files(tmp_path / "cache") == []


def test_a_changed_s3_object_is_detected_by_its_sha256(s3, tmp_path):
    original, changed = tiny_bytes(), tiny_bytes(0.5)
    s3.put("changing/tiny.pth", original)
    warm = tmp_path / "warm"
    pinned = s3_config(s3, warm, "changing/tiny.pth", sha(original)).models[0].checkpoint
    s3.put("changing/tiny.pth", changed)
    # A machine that already holds the pinned bytes keeps serving them, without asking S3.
    assert s3_config(s3, warm, "changing/tiny.pth", sha(original)).models[0].checkpoint == pinned
    # A fresh machine downloads the new object and refuses it.
    with pytest.raises(ConfigError, match=f"sha256 is {sha(changed)}, the config expects {sha(original)}; "
                                          "nothing was cached"):
        s3_config(s3, tmp_path / "fresh", "changing/tiny.pth", sha(original))
    assert cache_files(tmp_path / "fresh") == []
    # Unpinned, the new ETag means the new object is fetched.
    assert s3_config(s3, warm, "changing/tiny.pth").models[0].checkpoint.read_bytes() == changed


def test_check_takes_an_s3_source(s3, tmp_path, capsys):
    s3.put("check/tiny.pth", tiny_bytes())
    model = tiny_model_config("s3://models/check/tiny.pth")
    path = write_config(tmp_path, [model], allowed_sources=["s3://models/check/"], source_cache_dir=str(tmp_path / "c"),
                        s3_endpoint_url=s3.endpoint, s3_region="us-east-1", s3_access_key_id=s3.key_id,
                        s3_secret_access_key=s3.secret)
    assert main(["check", str(path)]) == 0, capsys.readouterr().err


# --- hf:// (a Hugging Face Hub file API on 127.0.0.1) ------------------------------------------------------


class Hub:
    """The Hub's file API for `repos` ({"org/name": {file: bytes}}), each at one commit that "main" names:
    HEAD/GET /{repo}/resolve/{revision}/{path} (X-Repo-Commit, ETag: the sha256 of an LFS file, as the Hub
    sends), GET /api/models/{repo}/revision/{revision} (sha and siblings, with their LFS sha256 and size)."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.commits = {repo: sha(repr(sorted(files.items())).encode())[:40] for repo, files in repos.items()}

    def route(self, method: str, path: str):
        api = re.fullmatch(r"/api/models/([\w.-]+/[\w.-]+)/revision/([\w.-]+)(\?blobs=true)?", path)
        if api and self.revision(api.group(1), api.group(2)):
            repo = api.group(1)
            siblings = [{"rfilename": name, "size": len(data), **({"lfs": {"sha256": sha(data), "size": len(data)}}
                                                                  if not name.endswith(".json") else {})}
                        for name, data in self.repos[repo].items()]
            return 200, {"Content-Type": "application/json"}, json.dumps(
                {"id": repo, "sha": self.commits[repo], "siblings": siblings}).encode()
        resolve = re.fullmatch(r"/([\w.-]+/[\w.-]+)/resolve/([\w.-]+)/(.+)", path)
        if resolve and self.revision(resolve.group(1), resolve.group(2)) and resolve.group(3) in self.repos[resolve.group(1)]:
            data = self.repos[resolve.group(1)][resolve.group(3)]
            return 200, {"X-Repo-Commit": self.commits[resolve.group(1)], "ETag": f'"{sha(data)}"'}, data
        return None

    def revision(self, repo: str, revision: str) -> bool:
        return repo in self.repos and revision in ("main", self.commits[repo])


def timm_folder_files(tmp_path: Path) -> dict[str, bytes]:
    from test_formats_timm_folder import save_folder

    folder = tmp_path / "saved"
    save_folder(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def hf_config(hub_server: FileServer, cache: Path, model: dict, **server_fields):
    settings = {"allowed_sources": ["hf://org"], "source_cache_dir": str(cache), "hf_endpoint": hub_server.base,
                **server_fields}
    return build_config({"models": [model], "server": settings})


def test_hf_model_folder_is_fetched_at_one_commit_and_fills_the_entry(serve_files, tmp_path):
    files = timm_folder_files(tmp_path)
    hub = Hub({"org/net": {**files, "README.md": b"# net", "flax_model.msgpack": b"x" * 1000}})
    server = serve_files(route=hub.route)
    cache = tmp_path / "cache"
    config = hf_config(server, cache, {"name": "net", "checkpoint": "hf://org/net", "device": "cpu"})
    spec = config.models[0]
    assert spec.architecture == "timm:test_resnet" and spec.labels is not None and len(spec.labels) == 10
    assert sorted(p.name for p in spec.checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    commit = hub.commits["org/net"]
    assert [r[1] for r in server.gets()] == ["/api/models/org/net/revision/main?blobs=true",
                                            f"/org/net/resolve/{commit}/config.json",
                                            f"/org/net/resolve/{commit}/model.safetensors"]
    from formats_helpers import served

    local = tmp_path / "local"
    local.mkdir()
    for name, data in files.items():
        (local / name).write_bytes(data)
    photo = [image_bytes((10, 200, 30), size=(40, 30))]
    entry = {"name": "net", "device": "cpu"}
    assert served({**entry, "checkpoint": str(spec.checkpoint)}, photo) == served({**entry, "checkpoint": str(local)}, photo)
    # Found again through the commit the revision names (one API call), and offline through the ref alone.
    before = len(server.requests)
    assert hf_config(server, cache, {"name": "net", "checkpoint": "hf://org/net"}).models[0].checkpoint == spec.checkpoint
    assert len(server.requests) == before + 1
    offline = hf_config(server, cache, {"name": "net", "checkpoint": "hf://org/net"}, offline=True,
                        hf_endpoint="http://127.0.0.1:1")
    assert offline.models[0].checkpoint == spec.checkpoint and len(server.requests) == before + 1


def test_hf_file_at_a_pinned_revision_is_served(serve_files, tmp_path):
    data = tiny_bytes()
    hub = Hub({"org/tiny": {"weights/tiny.pth": data}})
    server = serve_files(route=hub.route)
    commit = hub.commits["org/tiny"]
    config = hf_config(server, tmp_path / "cache", tiny_model_config(f"hf://org/tiny@{commit}/weights/tiny.pth",
                                                                     sha256=sha(data)))
    assert config.models[0].checkpoint.read_bytes() == data and predicted_label(config) == "blue"
    assert [r[:2] for r in server.requests] == [("HEAD", f"/org/tiny/resolve/{commit}/weights/tiny.pth"),
                                                ("GET", f"/org/tiny/resolve/{commit}/weights/tiny.pth")]


def test_hf_repo_without_a_model_folder_or_file_is_refused(serve_files, tmp_path):
    server = serve_files(route=Hub({"org/other": {"notes.txt": b"hi"}}).route)
    with pytest.raises(ConfigError, match="holds no config.json and weights file .*name a file instead"):
        hf_config(server, tmp_path / "cache", {"name": "x", "checkpoint": "hf://org/other"})
    with pytest.raises(ConfigError, match=r"HTTP 404 Not Found \(no such file\)"):
        hf_config(server, tmp_path / "cache", tiny_model_config("hf://org/other/missing.pth"))
    with pytest.raises(ConfigError, match="'hf://elsewhere/net' is not in allowed_sources"):
        hf_config(server, tmp_path / "cache", {"name": "x", "checkpoint": "hf://elsewhere/net"})


# --- the management API's load call ---------------------------------------------------------------------


def test_management_load_fetches_an_allowed_source_and_refuses_others(serve_files, ca, make_app, tiny_checkpoint, tmp_path):
    data = tiny_bytes(0.5)
    server = serve_files({"/weights/v2.pth": data}, tls=ca[1])
    app = make_app(tiny_model_config(tiny_checkpoint), enable_management=True, models_dir=str(tiny_checkpoint.parent),
                   allowed_sources=[f"{server.base}/weights/"], source_ca_file=str(ca[0].cert),
                   source_cache_dir=str(tmp_path / "cache"))
    client = app.test_client()
    refused = client.post("/models/tiny/versions", json={"version": "2", "checkpoint": f"{server.base}/other/v2.pth",
                                                          "sha256": sha(data)})
    assert refused.status_code == 400 and refused.json["error"]["message"] == (
        f"checkpoint is not a path under models_dir, and not a URL this server may fetch: '{server.base}/other/v2.pth' "
        f"is not in allowed_sources (allowed: ['{server.base}/weights/'])")
    assert server.requests == []
    wrong = client.post("/models/tiny/versions", json={"version": "2", "checkpoint": f"{server.base}/weights/v2.pth",
                                                        "sha256": "1" * 64})
    assert wrong.status_code == 409 and "fetching the checkpoint failed" in wrong.json["error"]["message"]
    loaded = client.post("/models/tiny/versions", json={"version": "2", "checkpoint": f"{server.base}/weights/v2.pth",
                                                         "sha256": sha(data)})
    assert loaded.status_code == 201, loaded.json
    versions = {v["version"]: v for v in client.get("/models/tiny").json["versions"]}
    assert versions["2"]["sha256"] == sha(data)
    assert versions["2"]["checkpoint"] == str(tmp_path / "cache" / "entries" / sha(data) / "v2.pth")


# --- deploy/k8s: the S3 example, uncommented, is a valid manifest the server reads -------------------------

EXAMPLE_KEYS = ("- name:", "value:", "envFrom:", "- secretRef:", "name:", "mountPath:", "emptyDir:", "sizeLimit:")


def uncommented(text: str) -> str:
    """The manifest with its commented S3 example switched on (the prose around it stays a comment)."""
    return "\n".join(re.sub(r"^(\s*)# ", r"\1", line) if re.match(r"^\s*# \s*(" + "|".join(map(re.escape, EXAMPLE_KEYS)) + ")", line)
                     else line for line in text.splitlines())


@pytest.mark.parametrize("manifest", ["deployment.yaml", "kserve/inferenceservice.yaml"])
def test_the_s3_example_in_the_manifests_is_valid_when_switched_on(manifest):
    import kubernetes_validate
    import yaml
    from servers import ROOT

    path = ROOT / "deploy" / "k8s" / manifest
    doc = yaml.safe_load(uncommented(path.read_text()))
    pod = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]["predictor"]
    container = pod["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "torch-serve-s3"}}]
    env = {e["name"]: e["value"] for e in container["env"]}
    cache = env["SERVE_SOURCE_CACHE_DIR"]
    assert cache in {m["mountPath"] for m in container["volumeMounts"]}
    assert "source-cache" in {v["name"] for v in pod["volumes"]}
    settings = build_config({"models": [tiny_model_config(Path("x.pth"))]}, env=env).server
    assert settings.allowed_sources == ("s3://my-models/",) and settings.source_cache_dir == Path(cache)
    if doc["kind"] == "Deployment":
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
