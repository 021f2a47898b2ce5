"""`pdserve prefill`: a prefill worker (PrefillService + KVTransferService) on gRPC."""

from __future__ import annotations

import argparse
import asyncio

DEFAULT_PORT = 50061


def add_parser(parser: argparse.ArgumentParser) -> None:
    from engine.cli_args import add_engine_args
    from prefill_worker.grpc_server import add_server_args

    add_server_args(parser, default_port=DEFAULT_PORT)
    add_engine_args(parser)
    g = parser.add_argument_group("kv transfer")
    g.add_argument("--kv-lease-ms", type=int, default=30_000, help="default lease on a prompt's KV")
    g.add_argument("--kv-max-lease-ms", type=int, default=300_000)
    g.add_argument(
        "--kv-transport",
        default="auto",
        choices=("auto", "grpc", "shm"),
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


def config_from_args(args: argparse.Namespace):
    from prefill_worker.config import PrefillWorkerConfig

    return PrefillWorkerConfig(
        lease_ms=args.kv_lease_ms,
        max_lease_ms=max(args.kv_max_lease_ms, args.kv_lease_ms),
        enable_shm=args.kv_transport != "grpc",
        transfer_delay_ms=args.debug_transfer_delay_ms,
        fill_freed_kv=args.debug_fill_freed_kv,
        advertise_address=args.advertise_address,
        engine_id=args.engine_id,
        drain_timeout_s=args.drain_timeout,
    )


def run(args: argparse.Namespace) -> int:
    from engine.cli_args import engine_config_from_args
    from engine.engine import LLMEngine
    from prefill_worker.grpc_server import (
        configure_logging,
        serve_until_signal,
        server_options_from_args,
    )
    from prefill_worker.server import start_prefill_server

    configure_logging(args.log_level)
    config = config_from_args(args)
    options = server_options_from_args(args)
    engine = LLMEngine(engine_config_from_args(args))

    async def main() -> None:
        server = await start_prefill_server(engine, config, options)
        announce = f"pdserve prefill listening on {options.host}:{server.running.port}"
        await serve_until_signal(server, announce)

    asyncio.run(main())
    return 0
