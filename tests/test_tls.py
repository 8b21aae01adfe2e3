"""TLS (serve/tls.py, gunicorn_conf.py): a real gunicorn on 127.0.0.1 with a certificate from a CA made
in the test; clients that trust it, that don't, plain HTTP, client certificates, the minimum version,
a renewed certificate without a restart, and the image's HEALTHCHECK command over HTTPS."""
from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from certs import TestCA
from conftest import expected_probs, image_bytes, tiny_model_config, write_config
from servers import GUNICORN, ROOT, Server, free_port

from serve.config import ServerSettings
from serve.errors import ConfigError
from serve.tls import TlsContext, build_context


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def ca(folder) -> TestCA:
    return TestCA(folder)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("other-ca"), name="someone else's CA")


@pytest.fixture(scope="module")
def model_config(folder) -> Path:
    import torch
    from conftest import tiny_net

    torch.save(tiny_net().state_dict(), folder / "tiny.pth")
    return write_config(folder, [tiny_model_config(folder / "tiny.pth")])


def install(issued, folder: Path) -> tuple[Path, Path]:
    """The certificate and key under fixed names, as a mounted Secret has them."""
    folder.mkdir(exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    for source, target in ((issued.key, key), (issued.cert, cert)):
        shutil.copyfile(source, target.with_name(target.name + ".new"))
        os.replace(target.with_name(target.name + ".new"), target)
    return cert, key


@pytest.fixture(scope="module")
def server(folder, ca, model_config):
    cert, key = install(ca.issue("server-first"), folder / "server")
    server = Server({"SERVE_CONFIG": str(model_config), "WEB_CONCURRENCY": "1",
                     "SERVE_TLS_CERT_FILE": str(cert), "SERVE_TLS_KEY_FILE": str(key)},
                    folder / "server.log", tls={"verify": str(ca.cert)})
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def mtls_server(folder, ca, model_config):
    """Client certificates from `ca` required, TLS 1.3 only."""
    issued = ca.issue("server-mtls")
    client = ca.issue("client", client=True)
    server = Server({"SERVE_CONFIG": str(model_config), "WEB_CONCURRENCY": "1",
                     "SERVE_TLS_CERT_FILE": str(issued.cert), "SERVE_TLS_KEY_FILE": str(issued.key),
                     "SERVE_TLS_CA_FILE": str(ca.cert), "SERVE_TLS_MIN_VERSION": "1.3"},
                    folder / "mtls.log", tls={"verify": str(ca.cert), "cert": (str(client.cert), str(client.key))})
    yield server
    assert server.stop() == 0


def peer(port: int, cafile: Path, **client) -> tuple[str, str]:
    """A raw TLS connection: the protocol version and the server certificate's common name."""
    context = ssl.create_default_context(cafile=str(cafile))
    if "max_version" in client:
        context.maximum_version = client["max_version"]
    if "cert" in client:
        context.load_cert_chain(*client["cert"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200 "), "no answer over TLS"
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
        return tls.version(), subject["commonName"]


@pytest.mark.server
def test_a_client_that_trusts_the_ca_gets_answers(server, ca):
    answer = requests.post(f"{server.url}/predictions/tiny", data=image_bytes((0, 255, 0)),
                           headers={"Content-Type": "image/png"}, verify=str(ca.cert), timeout=10)
    probs = [p["probability"] for p in answer.json()["predictions"]]
    assert probs == pytest.approx(sorted(expected_probs((0, 255, 0)).tolist(), reverse=True), abs=1e-6)
    assert server.url.startswith("https://")
    assert peer(server.port, ca.cert) == ("TLSv1.3", "server-first")
    assert peer(server.port, ca.cert, max_version=ssl.TLSVersion.TLSv1_2)[0] == "TLSv1.2"  # the default minimum


@pytest.mark.server
def test_a_client_that_does_not_trust_the_ca_is_refused(server, other_ca):
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"{server.url}/ping", timeout=5)  # the system's CAs
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"{server.url}/ping", verify=str(other_ca.cert), timeout=5)


@pytest.mark.server
def test_plain_http_to_the_tls_port_gets_no_answer(server):
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.port}/ping", timeout=5)
    # The server is fine afterwards.
    assert requests.get(f"{server.url}/ping", timeout=5, **server.tls).json() == {"status": "Healthy"}


def healthcheck() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, run with this interpreter."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    code = re.search(r'^HEALTHCHECK .*?CMD python -c "(.*)"$', text, re.M).group(1)
    return [sys.executable, "-c", code]


@pytest.mark.server
def test_the_images_healthcheck_speaks_https_when_tls_is_on(server, folder):
    env = {**os.environ, "PORT": str(server.port)}
    env.pop("SERVE_TLS_CERT_FILE", None)
    plain = subprocess.run(healthcheck(), env=env, capture_output=True, timeout=10)
    assert plain.returncode != 0  # http:// to a TLS port
    tls = subprocess.run(healthcheck(), env={**env, "SERVE_TLS_CERT_FILE": str(folder / "server" / "tls.crt")},
                         capture_output=True, timeout=10)
    assert tls.returncode == 0, tls.stderr


@pytest.mark.server
def test_a_renewed_certificate_is_served_without_a_restart(server, ca, folder):
    pid = server.proc.pid
    cert, _ = install(ca.issue("server-renewed"), folder / "server")
    assert peer(server.port, ca.cert)[1] == "server-renewed"
    # A broken renewal (not a certificate) keeps the previous one serving, and says why.
    cert.write_text("not a certificate\n")
    assert peer(server.port, ca.cert)[1] == "server-renewed"
    assert "TLS: cannot load tls_cert_file" in server.log.read_text()
    install(ca.issue("server-third"), folder / "server")
    assert peer(server.port, ca.cert)[1] == "server-third"
    assert server.proc.pid == pid and server.proc.poll() is None


@pytest.mark.server
def test_client_certificates_when_a_ca_is_configured(mtls_server, ca, other_ca, folder):
    assert requests.get(f"{mtls_server.url}/ready", timeout=5, **mtls_server.tls).status_code == 200
    assert peer(mtls_server.port, ca.cert, cert=mtls_server.tls["cert"])[0] == "TLSv1.3"
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(f"{mtls_server.url}/ping", verify=str(ca.cert), timeout=5)  # no client certificate
    stranger = other_ca.issue("stranger", client=True)
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(f"{mtls_server.url}/ping", verify=str(ca.cert), cert=(str(stranger.cert), str(stranger.key)),
                     timeout=5)
    with pytest.raises(ssl.SSLError):  # tls_min_version 1.3
        peer(mtls_server.port, ca.cert, cert=mtls_server.tls["cert"], max_version=ssl.TLSVersion.TLSv1_2)


@pytest.mark.server
def test_gunicorn_refuses_to_start_with_a_key_that_does_not_fit(ca, model_config, tmp_path):
    first, second = ca.issue("one"), ca.issue("two")
    env = {**os.environ, "SERVE_CONFIG": str(model_config), "PORT": str(free_port()), "SERVE_HOST": "127.0.0.1",
           "SERVE_TLS_CERT_FILE": str(first.cert), "SERVE_TLS_KEY_FILE": str(second.key)}
    done = subprocess.run(GUNICORN, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"serve: cannot load tls_cert_file {first.cert} with tls_key_file {second.key}: KEY_VALUES_MISMATCH" \
        in done.stderr, done.stderr[-2000:]


# --- the context itself, in-process ---------------------------------------------------------------


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> str:
    """A TLS handshake through memory buffers; the negotiated version, or the ssl.SSLError."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        finished = 0
        for side, out, peer_in in ((client, client_out, server_in), (server, server_out, client_in)):
            try:
                side.do_handshake()
                finished += 1
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if finished == 2:
            return client.version()
    raise AssertionError("handshake did not finish")


@pytest.mark.server
@pytest.mark.parametrize("minimum,client_max,expected", [
    ("1.2", ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
    ("1.2", ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
    ("1.3", ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
    ("1.3", ssl.TLSVersion.TLSv1_2, None),
])
def test_minimum_version(ca, minimum, client_max, expected):
    issued = ca.issue(f"min-{minimum}")
    context = build_context(ServerSettings(tls_cert_file=issued.cert, tls_key_file=issued.key, tls_min_version=minimum))
    client = ssl.create_default_context(cafile=str(ca.cert))
    client.maximum_version = client_max
    if expected is None:
        with pytest.raises(ssl.SSLError):
            handshake(context, client)
    else:
        assert handshake(context, client) == expected


def test_bad_files_are_config_errors(ca, tmp_path):
    issued = ca.issue("files")
    with pytest.raises(ConfigError, match=r"cannot load tls_cert_file .*missing\.crt .*No such file"):
        TlsContext(ServerSettings(tls_cert_file=tmp_path / "missing.crt", tls_key_file=issued.key))
    (tmp_path / "ca.pem").write_text("junk")
    with pytest.raises(ConfigError, match=r"cannot load tls_ca_file .*ca\.pem"):
        build_context(ServerSettings(tls_cert_file=issued.cert, tls_key_file=issued.key, tls_ca_file=tmp_path / "ca.pem"))


@pytest.mark.parametrize("settings,message", [
    ({"tls_cert_file": "a.crt"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_key_file": "a.key"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_ca_file": "ca.pem"}, "tls_ca_file (client certificates) needs tls_cert_file"),
    ({"tls_cert_file": "a.crt", "tls_key_file": "a.key", "tls_min_version": "1.1"}, "field 'tls_min_version'"),
])
def test_tls_settings_are_validated(tiny_checkpoint, settings, message):
    from serve.config import build_config

    with pytest.raises(ConfigError) as caught:
        build_config({"models": [tiny_model_config(tiny_checkpoint)], "server": settings})
    assert message in caught.value.message
