"""Engine flags shared by every command that builds an engine (vLLM's names)."""

from __future__ import annotations

import argparse
import re

from engine.config import ATTENTION_BACKENDS, DTYPES, EngineConfig
from engine.spec_decode.config import SpeculativeConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1000000' -> bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()[:1]])


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model", default=None, help="local HF model folder (default: SmolLM2-135M-Instruct)"
    )
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument(
        "--kv-cache-memory", type=parse_size, default=None, help="KV pool size, e.g. 1GiB"
    )
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-waiting", type=int, default=4096, help="bounded waiting queue")
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
    )
    g.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch threads for this process (default: torch's choice, one per core)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="CPU: run the eager module forward, not the compiled fused one",
    )
    g.add_argument(
        "--speculative-config",
        type=_speculative_config,
        default=None,
        help='speculative decoding as JSON (vLLM\'s fields), e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' or '
        '\'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\'; '
        '"disable_by_batch_size" turns it off for larger batches',
    )


def _speculative_config(text: str) -> SpeculativeConfig:
    try:
        return SpeculativeConfig.from_json(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=args.max_waiting,
        enable_prefix_caching=args.enable_prefix_caching,
        attention_backend=args.attention_backend,
        seed=args.seed,
        num_threads=args.num_threads,
        enforce_eager=args.enforce_eager,
        speculative_config=args.speculative_config,
    )
