"""`pdserve decode`: a decode worker (DecodeService) on gRPC."""

from __future__ import annotations

import argparse
import asyncio

DEFAULT_PORT = 50071


def add_parser(parser: argparse.ArgumentParser) -> None:
    from engine.cli_args import add_engine_args
    from prefill_worker.grpc_server import add_server_args

    add_server_args(parser, default_port=DEFAULT_PORT)
    add_engine_args(parser)
    g = parser.add_argument_group("kv transfer")
    g.add_argument(
        "--kv-transport",
        default="auto",
        choices=("auto", "grpc", "shm"),
        help="auto: shared memory with a prefill worker on this host, else gRPC",
    )
    g.add_argument(
        "--kv-max-chunk-bytes", type=int, default=0, help="0: server default (1 MiB, the cap)"
    )


def config_from_args(args: argparse.Namespace):
    from decode_worker.config import DecodeWorkerConfig

    return DecodeWorkerConfig(
        kv_transport=args.kv_transport,
        peer_tls_ca=args.tls_ca,
        max_chunk_bytes=args.kv_max_chunk_bytes,
        engine_id=args.engine_id,
        drain_timeout_s=args.drain_timeout,
    )


def run(args: argparse.Namespace) -> int:
    from decode_worker.server import start_decode_server
    from engine.cli_args import engine_config_from_args
    from engine.engine import LLMEngine
    from prefill_worker.grpc_server import (
        configure_logging,
        serve_until_signal,
        server_options_from_args,
    )

    configure_logging(args.log_level)
    config = config_from_args(args)
    options = server_options_from_args(args)
    engine = LLMEngine(engine_config_from_args(args))

    async def main() -> None:
        server = await start_decode_server(engine, config, options)
        announce = f"pdserve decode listening on {server.address}"
        await serve_until_signal(server, announce)

    asyncio.run(main())
    return 0
