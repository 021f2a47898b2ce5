"""Flags and the main loop of `pdserve prefill`, `pdserve decode` and `pdserve both` (one worker,
one role)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

from rpc.server import add_server_args

DEFAULT_PORTS = {"prefill": 50061, "decode": 50071, "both": 50081}


def transport_choices() -> tuple[str, ...]:
    from kvtransfer.transports import TRANSPORT_CHOICES

    return TRANSPORT_CHOICES


def add_worker_args(parser: argparse.ArgumentParser, role: str) -> None:
    from engine.cli_args import add_engine_args

    g = add_server_args(parser, default_port=DEFAULT_PORTS[role])
    g.add_argument("--engine-id", default=None, help="name in logs and load reports")
    g.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to drain on shutdown")
    g.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    )
    add_engine_args(parser)
    from rpc.sampling import add_max_logprobs_arg

    add_max_logprobs_arg(parser.add_argument_group("requests"))
    g = parser.add_argument_group("kv transfer")
    if role in ("prefill", "both"):
        _add_prefill_kv_args(g)
    if role == "decode":
        _add_decode_kv_args(g)
    if role == "both":
        _add_chunk_arg(g)


def _add_prefill_kv_args(g) -> None:
    g.add_argument("--kv-lease-ms", type=int, default=30_000, help="default lease on a prompt's KV")
    g.add_argument("--kv-max-lease-ms", type=int, default=300_000)
    g.add_argument(
        "--kv-transport",
        default="auto",
        choices=transport_choices(),
        help="grpc: never offer shared memory to decode workers",
    )
    g.add_argument(
        "--advertise-address", default=None, help="host:port decode workers use to reach us"
    )
    g.add_argument(
        "--debug-transfer-delay-ms", type=int, default=0, help="debug: delay every KV chunk"
    )
    g.add_argument(
        "--debug-fill-freed-kv",
        action="store_true",
        help="debug: overwrite freed blocks with NaNs (needs --no-enable-prefix-caching)",
    )


def _add_decode_kv_args(g) -> None:
    g.add_argument(
        "--kv-transport",
        default="auto",
        choices=transport_choices(),
        help="auto: shared memory with a prefill worker on this host, else gRPC",
    )
    _add_chunk_arg(g)
    g.add_argument(
        "--debug-step-delay-ms", type=int, default=0, help="debug: sleep after every engine step"
    )


def _add_chunk_arg(g) -> None:
    g.add_argument(
        "--kv-max-chunk-bytes", type=int, default=0, help="0: server default (1 MiB, the cap)"
    )


def config_from_args(role: str, args: argparse.Namespace, cluster_secret=None):
    from worker.config import BothWorkerConfig, DecodeWorkerConfig, PrefillWorkerConfig

    if role == "both":
        return BothWorkerConfig(
            prefill=config_from_args("prefill", args, cluster_secret),
            decode=config_from_args("decode", args, cluster_secret),
            engine_id=args.engine_id,
            drain_timeout_s=args.drain_timeout,
        )
    if role == "prefill":
        return PrefillWorkerConfig(
            lease_ms=args.kv_lease_ms,
            max_lease_ms=max(args.kv_max_lease_ms, args.kv_lease_ms),
            enable_shm=args.kv_transport != "grpc",
            transfer_delay_ms=args.debug_transfer_delay_ms,
            fill_freed_kv=args.debug_fill_freed_kv,
            advertise_address=args.advertise_address,
            engine_id=args.engine_id,
            drain_timeout_s=args.drain_timeout,
            cluster_secret=cluster_secret,
            max_logprobs=args.max_logprobs,
        )
    # With --tls-client-ca on the prefill workers, a decode worker presents its own server
    # certificate as its client certificate.
    mtls = args.tls_ca is not None and args.tls_cert is not None
    return DecodeWorkerConfig(
        kv_transport=args.kv_transport,
        peer_tls_ca=args.tls_ca,
        peer_tls_cert=args.tls_cert if mtls else None,
        peer_tls_key=args.tls_key if mtls else None,
        max_chunk_bytes=args.kv_max_chunk_bytes,
        step_delay_ms=getattr(args, "debug_step_delay_ms", 0),
        engine_id=args.engine_id,
        drain_timeout_s=args.drain_timeout,
        cluster_secret=cluster_secret,
        max_logprobs=args.max_logprobs,
    )


def run(role: str, args: argparse.Namespace, engine_config) -> int:
    """Serve until SIGINT/SIGTERM, then drain. `engine_config`: the engine's, model resolved."""
    import os

    from engine.engine import LLMEngine
    from rpc.auth import require_cluster_secret
    from rpc.server import configure_logging, serve_until_signal, server_options_from_args
    from worker.server import start_worker_server

    configure_logging(args.log_level)
    try:
        secret = require_cluster_secret(args.cluster_secret_file, os.environ)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"pdserve {role}: error: {exc}") from None
    config = config_from_args(role, args, secret)
    options = server_options_from_args(args, secret)
    if role == "prefill" and engine_config.speculative_config is not None:
        # Speculation runs where tokens are decoded; a prefill worker samples one token per
        # request, so it neither speculates nor loads a draft model.
        engine_config = dataclasses.replace(engine_config, speculative_config=None)
    engine = LLMEngine(engine_config)

    async def main() -> None:
        server = await start_worker_server(engine, config, options)
        port = server.running.port
        where = f"{options.host}:{port}" if role != "decode" else server.address
        await serve_until_signal(server, f"pdserve {role} listening on {where}")

    asyncio.run(main())
    return 0
