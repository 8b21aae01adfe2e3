"""The gRPC port as the master sees it: checked free before the workers bind it, without importing grpc
(grpcio is not fork-safe; serve/grpc_server.py runs in the workers only)."""
from __future__ import annotations

import socket

from serve.errors import ConfigError


def grpc_address(host: str, port: int) -> str:
    """host:port as gRPC writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Bind the port once, without SO_REUSEPORT: fails while any process listens there. Run in the master
    before the workers bind it with SO_REUSEPORT, which would otherwise silently share the port with
    another server of the same user (and split its calls between them).

    Raises: ConfigError: the port is taken or the address can't be bound.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is fine
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(f"grpc_port {port}: cannot listen on {grpc_address(host, port)}: "
                          f"{exc.strerror or exc} (another server there? set SERVE_GRPC_PORT)") from None
