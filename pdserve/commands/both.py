"""`pdserve both`: one worker in both roles (PrefillService + DecodeService + KVTransferService
over one engine, vLLM's `kv_both`) on gRPC."""

from __future__ import annotations

import argparse

ROLE = "both"


def add_parser(parser: argparse.ArgumentParser) -> None:
    from worker.cli import add_worker_args

    add_worker_args(parser, ROLE)


def config_from_args(args: argparse.Namespace):
    from worker.cli import config_from_args

    return config_from_args(ROLE, args)


def run(args: argparse.Namespace) -> int:
    from engine.cli_args import engine_config_from_args
    from pdserve.default_model import resolve_model
    from worker.cli import run

    args.model = str(resolve_model(args.model))  # the default model is converted here, once
    return run(ROLE, args, engine_config_from_args(args))
