"""gunicorn settings, all from ServeConfig (PORT, WEB_CONCURRENCY, SERVE_* variables, models.yaml).

Run: gunicorn -c serve/gunicorn_conf.py "serve.app:create_app()"

Models load once in the master before the fork (preload) when every model is on the CPU, so all
workers share the weights' pages copy-on-write. The master keeps torch at one thread while loading:
GNU OpenMP's thread pool does not survive fork(), and a worker using a pool its parent started
hangs. Each worker then sets its own intra-op thread count so workers x threads fits the cores.
CUDA can't be initialised before fork, so with a GPU model every worker loads its own copy.
"""
import atexit
import gc
import os
import shutil
import signal
import sys
import tempfile

import torch
from gunicorn import glogging

from serve import wire
from serve.auth import exposure_warning
from serve.config import load_config
from serve.cores import available_cores
from serve.errors import ConfigError
from serve.extras import require
from serve.grpc_port import check_port_free
from serve.memory import limit_arenas
from serve.spread import ConnectionCounts, spread_worker
from serve.tls import TlsContext

try:
    _config = load_config()
except ConfigError as exc:
    sys.exit(f"serve: {exc.message}")
_server = _config.server

bind = f"{_server.host}:{_server.port}"
threads = _server.threads
timeout = _server.timeout_s
graceful_timeout = _server.graceful_timeout_s
keepalive = 5
# gunicorn 27 opens a control socket that can change the server at run time: off, as every management surface.
control_socket_disable = True
# Heartbeat files in memory: works on a read-only root filesystem and never blocks on a slow disk.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# HTTPS only when a certificate is configured (serve/tls.py): TLS 1.2 or newer (tls_min_version),
# client certificates required when tls_ca_file is set, renewed files picked up without a restart.
if _server.tls_cert_file is not None:
    try:
        _tls = TlsContext(_server)
    except ConfigError as exc:
        sys.exit(f"serve: {exc.message}")
    certfile, keyfile = str(_server.tls_cert_file), str(_server.tls_key_file)

    def ssl_context(conf, default_ssl_context_factory):
        return _tls.current()
loglevel = _server.log_level
errorlog = "-"
accesslog = None  # the app writes one JSON line per request (logger serve.access) instead


class QuietAccessLogger(glogging.Logger):
    """gunicorn's logger, minus its access line. With logconfig_dict set, gunicorn formats every
    request's access atoms even with no access log to write them to: measurable work on a small model.
    A logger class of our own also means --access-logfile and gunicorn's statsd logger are not used:
    the JSON access line and /metrics (Prometheus) take their place."""

    def access(self, resp, req, environ, request_time) -> None:
        pass


logger_class = QuietAccessLogger
wire.install()  # head and body in one send(): a killed worker's answer is whole or absent (serve/wire.py)
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"},
        "json": {"()": "serve.access.JsonFormatter"},
        "bare": {"format": "%(message)s"},
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": _server.log_format},
        "access": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "bare"},
    },
    "root": {"level": loglevel.upper(), "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": ["stderr"], "propagate": False},
        "serve.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
    },
}
# Prometheus multiprocess mode: every worker writes its values under one directory that /metrics
# aggregates; it must be set before prometheus_client is first imported (the app, loaded later).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="serve-metrics-")
    _master_pid = os.getpid()
    atexit.register(lambda: os.getpid() == _master_pid and shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], True))
# The management API's control file (serve/control_file.py) lives in a directory every worker shares:
# state_dir, or one made here (writable on a read-only root: /dev/shm or the temp dir) and removed
# when the master exits. It is read by the app, so it goes through the environment like the metrics'.
if _server.enable_management and _server.state_dir is None:
    os.environ["SERVE_STATE_DIR"] = tempfile.mkdtemp(prefix="serve-state-", dir=worker_tmp_dir)
    _state_master = os.getpid()
    atexit.register(lambda: os.getpid() == _state_master and shutil.rmtree(os.environ["SERVE_STATE_DIR"], True))
# NVML answers "is there a GPU" without initialising CUDA in the master, which would break forked workers.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
preload_app = _server.preload if _server.preload is not None else not any(
    m.device.startswith("cuda") or (m.device == "auto" and torch.cuda.is_available()) for m in _config.models
)
cpus = available_cores()  # affinity, capped by a container's CPU limit
# One process per GPU: with several GPUs, no preload and every model on "cuda"/"auto", each worker is
# pinned to one GPU (CUDA_VISIBLE_DEVICES), taking the lowest slot free; a respawned worker takes its
# predecessor's.
gpu_count = torch.cuda.device_count() if not preload_app else 0
pin_gpus = gpu_count > 1 and all(m.device in ("cuda", "auto") for m in _config.models)
# CPU: a worker per core; they share the cores batch by batch (serve/cores.py). GPU: one per GPU.
workers = _server.workers or (cpus if preload_app else max(1, gpu_count))
# gthread, with new connections taken by the worker holding the fewest (serve/spread.py): a keep-alive
# connection stays with one worker, so an uneven spread queues requests on one while the other idles.
_connections = ConnectionCounts(max(64, 2 * workers))  # room for workers added at run time (TTIN)
worker_class = spread_worker(_connections)
# A fixed SERVE_TORCH_THREADS pins every worker's intra-op threads instead of sharing.
torch_threads = _server.torch_threads


limit_arenas(2)
if preload_app:
    torch.set_num_threads(1)


def pre_fork(server, worker):
    # Everything loaded so far lives as long as the process: keep it out of the collector's scans
    # (and its pages shared copy-on-write, which a collection would touch).
    gc.freeze()
    worker.slot = _connections.free_slot({getattr(w, "slot", None) for w in server.WORKERS.values()})
    if pin_gpus:
        taken = {getattr(w, "gpu_slot", None) for w in server.WORKERS.values()}
        worker.gpu_slot = min(set(range(gpu_count)) - taken, default=len(taken) % gpu_count)


def post_fork(server, worker):
    if pin_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(worker.gpu_slot)
        server.log.info("worker %s: GPU %d", worker.pid, worker.gpu_slot)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    threads_note = torch_threads or f"up to {cpus} (shared)"
    server.log.info("worker %s: torch threads %s, preload=%s", worker.pid, threads_note, preload_app)


# gRPC (serve/grpc_server.py, docs/grpc.md): a server in every worker, made after the fork (grpcio is not
# fork-safe: nothing of it is imported here or in the app the master preloads), on grpc_port with
# SO_REUSEPORT. SIGTERM starts its graceful stop at once, beside gunicorn's own for HTTP; the worker waits
# for it on exit. Its grace ends before the master's graceful_timeout SIGKILLs the worker.
grpc_grace_s = max(1.0, _server.graceful_timeout_s - 2)


def on_starting(server):
    if _server.grpc_port:
        try:
            require("grpc", "grpc_port (the gRPC server)")
            require("grpc_health", "grpc_port (the gRPC health service)")
            check_port_free(_server.host, _server.grpc_port)
        except ConfigError as exc:
            raise RuntimeError(f"serve: {exc.message}") from None  # gunicorn prints it and exits 1


def post_worker_init(worker):
    """The worker's app is loaded: catch up with the control file, then start every model's runtime here
    (ONNX Runtime sessions are made in the process that runs them) and its tracer (the batch span processor's
    thread is not fork-safe), all before it takes a request; then the gRPC server, if grpc_port is set (a port
    it can't bind stops the server, as a model that doesn't load)."""
    extensions = getattr(worker.wsgi, "extensions", {})
    lifecycle = extensions.get("serve.lifecycle")
    if lifecycle is not None:
        lifecycle.start()
    service = extensions.get("serve")
    if service is not None:
        # One worker never runs beside another; the host's load counts less the master's and workers' own.
        service.start_worker(busy_sessions=workers > 1, server_pid=os.getppid())
    if _server.grpc_port and service is not None:
        from serve.grpc_server import GrpcServer

        worker.grpc = GrpcServer.start(service, extensions["serve.metrics"], extensions.get("serve.api_keys"),
                                       service.settings)
        worker.log.info("worker %s: gRPC on %s", worker.pid, worker.grpc.address)
        on_term = signal.getsignal(signal.SIGTERM)  # gunicorn's: stop taking HTTP requests, finish those in flight

        def stop_both(signum, frame):
            worker.grpc.begin_stop(grpc_grace_s)
            on_term(signum, frame)

        signal.signal(signal.SIGTERM, stop_both)


def worker_int(worker):
    """SIGINT / SIGQUIT: a quick stop, gRPC calls in flight cancelled."""
    if getattr(worker, "grpc", None) is not None:
        worker.grpc.begin_stop(0)


def worker_exit(server, worker):
    """HTTP is drained: wait for the gRPC calls still in flight (begun at SIGTERM, grpc_grace_s at most),
    then export the spans still batched (tracing: serve/tracing.py; its provider was made in this worker)."""
    if getattr(worker, "grpc", None) is not None:
        worker.grpc.stop(grpc_grace_s)
    service = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("serve")
    if service is not None:
        service.tracing.shutdown()


def when_ready(server):
    hosts = [address[0] for address in server.cfg.address if isinstance(address, tuple)]
    warning = exposure_warning(_server, hosts)
    if warning:
        server.log.warning(warning)


def child_exit(server, worker):
    # Imported here, not at the top: serve.metrics imports prometheus_client, which picks its
    # multiprocess mode once, when first imported; that must be after PROMETHEUS_MULTIPROC_DIR is set
    # above (tests/test_imports.py lists this import and checks that this file loads no prometheus_client).
    from serve.metrics import mark_worker_dead

    mark_worker_dead(worker.pid)
    _connections.leave(worker.slot)
