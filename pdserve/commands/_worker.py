"""The three worker commands (`pdserve prefill`, `pdserve decode`, `pdserve both`) differ only in
their role. Nothing from `worker/` is imported until a command runs, so building the CLI parser
(the gateway's process included) loads no engine code."""

from __future__ import annotations

import argparse


def role_command(role: str):
    """`add_parser`, `config_from_args` and `run` of the command for `role`."""

    def add_parser(parser: argparse.ArgumentParser) -> None:
        from worker.cli import add_worker_args

        add_worker_args(parser, role)

    def config_from_args(args: argparse.Namespace):
        from worker.cli import config_from_args

        return config_from_args(role, args)

    def run(args: argparse.Namespace) -> int:
        from engine.cli_args import engine_config_from_args
        from pdserve.default_model import resolve_model
        from worker.cli import run

        args.model = str(resolve_model(args.model))  # the default model is converted here, once
        return run(role, args, engine_config_from_args(args))

    return add_parser, config_from_args, run
