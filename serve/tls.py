"""The server's TLS context: certificate and key, a minimum protocol version, optional client certificates.

gunicorn asks for a context on every new connection (its `ssl_context` hook, set in gunicorn_conf.py);
TlsContext answers the one it built, and builds a new one only when the certificate, key or CA file
changes, so a renewed certificate (cert-manager, a rotated Secret) is served without a restart. A
new set of files that doesn't load (a key that doesn't match its certificate, half-written files)
keeps the previous context and logs why, once per change.
"""
from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

from serve.auth import file_signature
from serve.config import ServerSettings
from serve.errors import ConfigError

log = logging.getLogger(__name__)

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def build_context(server: ServerSettings) -> ssl.SSLContext:
    """A server-side context from the settings' files.

    Raises:
        ConfigError: a file is missing or unreadable, or the key doesn't fit the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[server.tls_min_version]
    try:
        context.load_cert_chain(certfile=server.tls_cert_file, keyfile=server.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load tls_cert_file {server.tls_cert_file} with tls_key_file "
                          f"{server.tls_key_file}: {_reason(exc)}") from None
    if server.tls_ca_file is not None:
        try:
            context.load_verify_locations(cafile=server.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load tls_ca_file {server.tls_ca_file}: {_reason(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


class TlsContext:
    """The current context, rebuilt when one of its files changes."""

    def __init__(self, server: ServerSettings):
        """Raises: ConfigError: the files don't make a context (the server must not start)."""
        self._server = server
        self._files = [Path(p) for p in (server.tls_cert_file, server.tls_key_file, server.tls_ca_file) if p]
        self._signature = self._signatures()
        self._context = build_context(server)
        self._lock = threading.Lock()

    def _signatures(self) -> tuple:
        return tuple(file_signature(p) for p in self._files)

    def current(self) -> ssl.SSLContext:
        if self._signatures() != self._signature:
            with self._lock:
                signature = self._signatures()
                if signature != self._signature:
                    self._signature = signature
                    try:
                        self._context = build_context(self._server)
                        log.info("TLS: certificate files changed, new connections use them")
                    except ConfigError as exc:
                        log.error("TLS: %s; new connections keep the previous certificate", exc.message)
        return self._context
