"""`pdserve convert`: turn the bundled SmolLM2 GGUF into an fp32 Hugging Face folder."""

from __future__ import annotations

import argparse
import os
import sys

from pdserve.default_model import (
    DEFAULT_MODEL_NAME,
    convert_default_model,
    default_model_dir,
    is_converted,
)

CACHE_DIR_ENV = "PDSERVE_CACHE_DIR"


def add_cache_dir_arg(parser: argparse.ArgumentParser) -> None:
    """`--cache-dir`, shared by the commands that may convert the default model."""
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get(CACHE_DIR_ENV),
        help=f"where converted models live (env {CACHE_DIR_ENV}; default ~/.cache/pdserve/models)",
    )


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_cache_dir_arg(parser)
    parser.add_argument(
        "--force", action="store_true", help="convert again even if a converted folder exists"
    )


def run(args: argparse.Namespace) -> int:
    target = default_model_dir(args.cache_dir)
    if is_converted(target) and not args.force:
        print(f"{DEFAULT_MODEL_NAME} is already converted: {target} (use --force to redo)")
        return 0
    try:
        folder = convert_default_model(args.cache_dir, force=args.force)
    except FileNotFoundError as exc:  # the GGUF package is not installed
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{DEFAULT_MODEL_NAME} converted: {folder}")
    return 0
