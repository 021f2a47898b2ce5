"""An asyncio gRPC server with grpc.health.v1 health, server reflection and optional TLS/mTLS,
and the flags and signal handling every served process shares."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from rpc.auth import ClusterSecret, ClusterTokenInterceptor, add_cluster_secret_arg

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 << 20  # KV chunks are <= 1 MiB; prompts of 1M tokens fit
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True, slots=True)
class ServerOptions:
    host: str = "127.0.0.1"  # binding anything else is an explicit choice
    port: int = 0  # 0: any free port
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # with it, clients must present a certificate it signed
    max_message_bytes: int | None = MAX_MESSAGE_BYTES  # None: gRPC's defaults
    reuse_port: bool = False  # SO_REUSEPORT: a second server could bind the same port
    # With it, every call except health and reflection needs the cluster token (rpc/auth.py).
    cluster_secret: ClusterSecret | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert/--tls-key")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def grpc_options(self) -> list[tuple[str, int]]:
        options = [("grpc.so_reuseport", int(self.reuse_port))]
        if self.max_message_bytes is not None:
            options[:0] = [
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
            ]
        return options


@dataclass(slots=True)
class RunningServer:
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        """grpc.health.v1 status of the server ("") and of every registered service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(
    options: ServerOptions,
    register: Callable[[grpc.aio.Server], list[str]],
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
) -> RunningServer:
    """Create, register services (`register` returns their full names), bind, start."""
    chain = list(interceptors or ())
    if options.cluster_secret is not None:
        chain.insert(0, ClusterTokenInterceptor(options.cluster_secret))
    server = grpc.aio.server(interceptors=chain or None, options=options.grpc_options())
    names = tuple(register(server))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*names, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    address = f"{options.host}:{options.port}"
    port = (
        server.add_secure_port(address, _server_credentials(options))
        if options.tls
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    running = RunningServer(server, health, port, names)
    await running.set_serving(True)
    return running


def _server_credentials(options: ServerOptions) -> grpc.ServerCredentials:
    assert options.tls_cert is not None and options.tls_key is not None
    pair = [(options.tls_key.read_bytes(), options.tls_cert.read_bytes())]
    if options.tls_client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=options.tls_client_ca.read_bytes(), require_client_auth=True
    )


def add_server_args(parser, *, default_port: int):
    """Address and TLS flags (the group, for callers that add their own flags to it)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=default_port, help="0: any free port")
    g.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM)")
    g.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    g.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="CA (PEM): require client certificates it signed (mTLS)",
    )
    g.add_argument(
        "--tls-ca", type=Path, default=None, help="CA (PEM) to trust when calling TLS peers"
    )
    add_cluster_secret_arg(g)
    return g


def server_options_from_args(args, cluster_secret: ClusterSecret | None = None) -> ServerOptions:
    return ServerOptions(
        cluster_secret=cluster_secret,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def serve_until_signal(server, announce: str) -> None:
    """Print the listening line, wait for SIGINT/SIGTERM, then `await server.stop()` (drain)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(announce, flush=True)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
