"""`pdserve bench speculative`: output tok/s with and without speculative decoding, one run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

DEFAULT_OUTPUT_JSON = "bench-speculative.json"


def add_parser(parser: argparse.ArgumentParser) -> None:
    from engine.cli_args import add_engine_args
    from pdserve.commands.convert import add_cache_dir_arg

    add_engine_args(parser)  # --speculative-config: the speculating engine (default: n-gram)
    add_cache_dir_arg(parser)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    g.add_argument("--batch-sizes", default="32", help="concurrent cases, e.g. 4,8,32")
    g.add_argument("--repeats", type=int, default=2, help="runs per case and engine (best kept)")
    g.add_argument(
        "--also-always-on",
        action="store_true",
        help="also run an engine that speculates at every batch size (to place the threshold)",
    )
    g.add_argument("--output-json", default=DEFAULT_OUTPUT_JSON)


def run(args: argparse.Namespace) -> int:
    import torch

    from engine.cli_args import engine_config_from_args
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.spec_decode.config import SpeculativeConfig
    from pdserve.bench.speculative import build_cases, run_cases
    from pdserve.default_model import resolve_model

    args.model = str(resolve_model(args.model, args.cache_dir))
    config = engine_config_from_args(args)
    spec = config.speculative_config or SpeculativeConfig(method="ngram")
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    options.pop("model")
    options.pop("speculative_config")
    engines = {
        "plain": LLM(args.model, **options),
        "speculative": LLM(args.model, speculative_config=spec, **options),
    }
    if args.also_always_on:
        always = dataclasses.replace(spec, disable_by_batch_size=None)
        engines["speculative_always_on"] = LLM(args.model, speculative_config=always, **options)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    cases = build_cases(engines["plain"].tokenizer, batch_sizes)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    results = run_cases(engines, cases, params, args.repeats)
    report = {
        "model": args.model,
        "speculative_config": json.loads(spec.to_json()),
        "runner": engines["plain"].engine.runner.describe(),
        "max_tokens": args.max_tokens,
        "sampling": "greedy",
        "num_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cases": results,
    }
    for entry in results:
        line = f"{entry['case']:<32} plain {entry['plain']['output_tok_s']:7.1f} tok/s"
        for name in engines:
            if name != "plain":
                r = entry[name]
                line += (
                    f" | {name} {r['output_tok_s']:7.1f} tok/s x{r['speedup']:.2f}"
                    f" (accept {r.get('acceptance_rate', 0):.2f},"
                    f" same tokens {r['same_tokens_as_plain']})"
                )
        print(line)
    Path(args.output_json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output_json}")
    return 0
