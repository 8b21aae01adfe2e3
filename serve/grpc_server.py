"""The gRPC server of one gunicorn worker: started after the fork (post_worker_init), stopped with the worker.

grpcio is not fork-safe, and the master loads the models before forking (preload), so nothing of gRPC
exists in the master: gunicorn_conf.py imports this module only inside a worker. Every worker binds
grpc_port with SO_REUSEPORT, so the kernel spreads connections over the workers as gunicorn's shared
socket spreads HTTP ones. Each server holds the GRPCInferenceService (serve/grpc_door.py) and the
standard health service (grpc.health.v1, for kubelet's grpc probes: SERVING once the worker's models
are warm, NOT_SERVING from SIGTERM on), with max_message_bytes each way, and TLS from the HTTP
server's certificate settings (re-read when the files change, as serve/tls.py does for HTTPS).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serve.auth import ApiKeys, file_signature
from serve.config import ServerSettings
from serve.errors import ConfigError
from serve.grpc_door import SERVICE, InferenceDoor
from serve.grpc_port import grpc_address
from serve.metrics import Metrics
from serve.service import PredictionService
from serve.tls import build_context

log = logging.getLogger(__name__)


class CertificateFiles:
    """The certificate settings as gRPC's server certificate configuration, fetched again when a file changes."""

    def __init__(self, server: ServerSettings):
        self._server = server
        self._files = [Path(p) for p in (server.tls_cert_file, server.tls_key_file, server.tls_ca_file) if p]
        self._signature = self._signatures()
        build_context(server)  # raises ConfigError for files that don't make a context
        self._lock = threading.Lock()

    def _signatures(self) -> tuple:
        return tuple(file_signature(p) for p in self._files)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        server = self._server
        ca = Path(server.tls_ca_file).read_bytes() if server.tls_ca_file else None
        pair = (Path(server.tls_key_file).read_bytes(), Path(server.tls_cert_file).read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks on every new connection: a new configuration when the files changed and load, else None."""
        with self._lock:
            signature = self._signatures()
            if signature == self._signature:
                return None
            self._signature = signature
            try:
                build_context(self._server)
                configuration = self.configuration()
            except (ConfigError, OSError) as exc:
                log.error("gRPC TLS: %s; new connections keep the previous certificate", getattr(exc, "message", exc))
                return None
            log.info("gRPC TLS: certificate files changed, new connections use them")
            return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.configuration(), self.changed,
                                                   require_client_authentication=self._server.tls_ca_file is not None)


class GrpcServer:
    """One worker's gRPC server."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, address: str):
        self.server = server
        self.health = health_servicer
        self.address = address
        self._stopped: threading.Event | None = None
        self._lock = threading.RLock()  # a signal handler may call begin_stop inside stop

    @classmethod
    def start(cls, service: PredictionService, metrics: Metrics, keys: ApiKeys | None,
              settings: ServerSettings) -> GrpcServer:
        """Serve on settings.host:settings.grpc_port in this process.

        Raises: ConfigError: the port can't be bound or the certificate files don't load.
        """
        limit = settings.grpc_max_message_bytes
        server = grpc.server(
            ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="grpc"),
            options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit)],
        )
        server.add_generic_rpc_handlers((InferenceDoor(service, metrics, keys).handler(),))
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        address = grpc_address(settings.host, settings.grpc_port)
        try:
            if settings.tls_cert_file is not None:
                if settings.tls_min_version != "1.2":
                    log.warning("gRPC accepts TLS 1.2 and 1.3 (grpcio sets no minimum version); "
                                "tls_min_version %s applies to HTTPS only", settings.tls_min_version)
                port = server.add_secure_port(address, CertificateFiles(settings).credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises when the bind fails
            raise ConfigError(f"grpc_port {settings.grpc_port}: cannot listen on {address}: {exc}") from None
        if port == 0:
            raise ConfigError(f"grpc_port {settings.grpc_port}: cannot listen on {address}")
        server.start()
        for name in ("", SERVICE):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return cls(server, health_servicer, address)

    def begin_stop(self, grace_s: float) -> threading.Event:
        """Refuse new calls and report NOT_SERVING from now on; calls in flight get grace_s to finish.
        Safe to call again (the first call's grace holds) and from a signal handler."""
        with self._lock:
            if self._stopped is None:
                self.health.enter_graceful_shutdown()
                self._stopped = self.server.stop(grace_s)
            return self._stopped

    def stop(self, grace_s: float) -> None:
        """begin_stop, then wait until the calls in flight are done (grace_s at most)."""
        self.begin_stop(grace_s).wait(grace_s + 1)
