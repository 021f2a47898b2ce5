"""`pdserve generate`: offline generation with the `LLM` API (a quick demo of the engine).

With no `--prompt`, a few built-in chat prompts are run through the model's chat template.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from typing import Any

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a GPU is.",
    "Give me three tips for learning Python.",
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    from engine.cli_args import add_engine_args
    from pdserve.commands.convert import add_cache_dir_arg

    add_engine_args(parser)
    add_cache_dir_arg(parser)
    g = parser.add_argument_group("generation")
    g.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="a prompt (repeat for several); default: built-in chat prompts",
    )
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message in the chat template (always on for the demo)",
    )


def run(args: argparse.Namespace) -> int:
    from engine.sampling_params import SamplingParams

    prompts = list(args.prompt) or list(DEMO_PROMPTS)
    chat = args.chat or not args.prompt
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    llm = _make_llm(args)
    start = time.perf_counter()
    if chat:
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        outputs = llm.chat(conversations, params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    _print_outputs(prompts, outputs)
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        f"{len(outputs)} prompts, {num_tokens} tokens in {elapsed:.2f}s "
        f"({num_tokens / max(elapsed, 1e-9):.1f} tok/s)"
    )
    return 0


def _make_llm(args: argparse.Namespace) -> Any:
    """Build the `LLM`, converting the default model first when --model is not given."""
    from engine.cli_args import engine_config_from_args
    from engine.llm import LLM
    from pdserve.default_model import resolve_model

    args.model = str(resolve_model(args.model, args.cache_dir))
    config = engine_config_from_args(args)
    return LLM(**{f.name: getattr(config, f.name) for f in fields(config)})


def _print_outputs(prompts: list[str], outputs: list[Any]) -> None:
    for prompt, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        print(f"--- prompt: {prompt!r}")
        print(f"--- completion ({len(completion.token_ids)} tokens, {completion.finish_reason}):")
        print(completion.text.strip())
        print()
