"""`pdserve bench serve`: load-test an OpenAI-compatible endpoint (flags as in `vllm bench serve`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from pdserve.bench.client import CHAT_ENDPOINT, ENDPOINTS, RequestInput, headers
from pdserve.bench.datasets import (
    RandomDatasetConfig,
    SampleRequest,
    Tokenizer,
    jsonl_requests,
    random_requests,
    sharegpt_requests,
)
from pdserve.bench.metrics import METRICS, calculate_metrics, parse_goodput
from pdserve.bench.report import RunInfo, build_result, default_filename, now_stamp, save_result
from pdserve.bench.report import summary as format_summary
from pdserve.bench.runner import LoadConfig, probe, run_load

PROBE_MAX_TOKENS = 16
# vllm bench serve's backends that speak OpenAI's API, and the route each sends to.
BACKENDS = ("openai", "openai-chat", "vllm")
COMPLETIONS_ENDPOINT = "/v1/completions"


def add_parser(p: argparse.ArgumentParser) -> None:
    _add_target_args(p.add_argument_group("target"))
    _add_dataset_args(p.add_argument_group("dataset"))
    _add_load_args(p.add_argument_group("load"))
    _add_result_args(p.add_argument_group("results"))


def _add_target_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000")
    g.add_argument("--host", default="127.0.0.1", help="used when --base-url is not given")
    g.add_argument("--port", type=int, default=8000, help="used when --base-url is not given")
    g.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="as vllm bench serve: openai and vllm send completions, openai-chat chat completions",
    )
    g.add_argument(
        "--endpoint", default=None, choices=ENDPOINTS, help="default: the backend's route"
    )
    g.add_argument(
        "--model", default=None, help="model name to send (default: first of /v1/models)"
    )
    g.add_argument("--tokenizer", default=None, help="local HF folder for counting tokens")
    g.add_argument("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY)")


def _add_dataset_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--dataset-name",
        default="random",
        help="'random', 'sharegpt', 'custom' or a JSONL path",
    )
    g.add_argument(
        "--dataset-path",
        default=None,
        help="JSONL of prompts (custom) or a ShareGPT-format JSON file (sharegpt)",
    )
    g.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="max tokens per ShareGPT request (default: the length of the recorded answer)",
    )
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--random-prefix-len", type=int, default=0)
    g.add_argument(
        "--custom-output-len", type=int, default=256, help="max tokens for JSONL prompts"
    )


def _add_load_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--request-rate", type=float, default=math.inf, help="req/s (default inf)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1.0 is Poisson")
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--disable-tqdm", action="store_true")


def _add_result_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--goodput", nargs="+", default=[], metavar="NAME:MS", help="e.g. ttft:500 tpot:50"
    )
    g.add_argument("--percentile-metrics", default=",".join(METRICS))
    g.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    g.add_argument("--save-result", action="store_true")
    g.add_argument("--save-detailed", action="store_true", help="per-request arrays in the JSON")
    g.add_argument("--result-dir", default=".")
    g.add_argument("--result-filename", default=None)
    g.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE")
    g.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots to DIR")


def _selected_metrics(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {unknown}; choose from {METRICS}")
    return names


def _percentiles(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles: not numbers: {text!r}") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError(f"--metric-percentiles must be in (0, 100], got {text!r}")
    return values


def _metadata(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--metadata expects KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def first_model(base_url: str, api_key: str | None) -> str:
    url = f"{base_url}/v1/models"
    try:
        resp = httpx.get(url, headers=headers(api_key), timeout=30.0)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"cannot pick a model from {url} ({exc}); pass --model") from None


def load_tokenizer(path: str | None) -> Tokenizer | None:
    if path is None:
        return None
    from transformers import AutoTokenizer  # heavy: only when asked for

    return AutoTokenizer.from_pretrained(path)


def sample_requests(args: argparse.Namespace, tokenizer: Tokenizer | None) -> list[SampleRequest]:
    if args.dataset_name == "random":
        cfg = RandomDatasetConfig(
            num_prompts=args.num_prompts,
            input_len=args.random_input_len,
            output_len=args.random_output_len,
            range_ratio=args.random_range_ratio,
            prefix_len=args.random_prefix_len,
            seed=args.seed,
        )
        return random_requests(cfg, tokenizer)
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.dataset_name == "sharegpt":
        if args.dataset_path is None:
            raise ValueError("--dataset-name sharegpt needs --dataset-path (a local JSON file)")
        return sharegpt_requests(
            Path(args.dataset_path), args.num_prompts, tokenizer, args.seed,
            args.sharegpt_output_len,
        )  # fmt: skip
    path = args.dataset_path if args.dataset_name == "custom" else args.dataset_name
    if path is None:
        raise ValueError("--dataset-name custom needs --dataset-path")
    return jsonl_requests(
        Path(path), args.num_prompts, args.custom_output_len, tokenizer, args.seed
    )


def request_inputs(
    args: argparse.Namespace, model: str, samples: list[SampleRequest]
) -> list[RequestInput]:
    api_url = f"{args.base_url}{args.endpoint}"
    return [
        RequestInput(
            api_url=api_url,
            model=model,
            prompt=s.prompt,
            prompt_len=s.prompt_len,
            output_len=s.expected_output_len,
            chat=args.endpoint == CHAT_ENDPOINT,
            ignore_eos=args.ignore_eos,
            temperature=args.temperature,
            api_key=args.api_key,
        )
        for s in samples
    ]


def _counter(tokenizer: Tokenizer | None) -> Callable[[str], int] | None:
    if tokenizer is None:
        return None
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def _normalize(args: argparse.Namespace) -> None:
    args.base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    wants_chat = args.backend == "openai-chat"
    if args.endpoint is None:
        args.endpoint = CHAT_ENDPOINT if wants_chat else COMPLETIONS_ENDPOINT
    elif args.backend is not None and wants_chat != (args.endpoint == CHAT_ENDPOINT):
        raise ValueError(f"--backend {args.backend} does not send to --endpoint {args.endpoint}")
    if args.backend is None:
        args.backend = "openai-chat" if args.endpoint == CHAT_ENDPOINT else "openai"
    args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")


def run(args: argparse.Namespace) -> int:
    try:
        _normalize(args)
        return _run(args)
    except ValueError as exc:
        print(f"pdserve bench serve: error: {exc}", file=sys.stderr)
        return 2


@dataclasses.dataclass(slots=True, frozen=True)
class _Plan:
    """Everything decided before the first request is sent."""

    info: RunInfo
    inputs: list[RequestInput]
    load: LoadConfig
    selected: tuple[str, ...]
    percentiles: list[float]
    metadata: dict[str, str]
    count_tokens: Callable[[str], int] | None


def _plan(args: argparse.Namespace) -> _Plan:
    selected = _selected_metrics(args.percentile_metrics)
    percentiles = _percentiles(args.metric_percentiles)
    slo = parse_goodput(args.goodput)
    load = LoadConfig(
        args.request_rate, args.burstiness, args.max_concurrency, args.seed, args.disable_tqdm
    )
    model = args.model or first_model(args.base_url, args.api_key)
    tokenizer = load_tokenizer(args.tokenizer)
    inputs = request_inputs(args, model, sample_requests(args, tokenizer))
    info = RunInfo(
        date=now_stamp(),
        backend=args.backend,
        base_url=args.base_url,
        endpoint=args.endpoint,
        model_id=model,
        tokenizer_id=args.tokenizer,
        num_prompts=len(inputs),
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        goodput_slo_ms=slo,
    )
    return _Plan(
        info, inputs, load, selected, percentiles, _metadata(args.metadata), _counter(tokenizer)
    )


def _check_endpoint(plan: _Plan) -> bool:
    first = plan.inputs[0]
    print(f"Testing {first.api_url} with model {first.model!r} ...")
    check = probe(dataclasses.replace(first, output_len=min(first.output_len, PROBE_MAX_TOKENS)))
    if not check.success:
        print(f"pdserve bench serve: the first request failed: {check.error}", file=sys.stderr)
    return check.success


def _run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if not _check_endpoint(plan):
        return 1
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
    print(
        f"Sending {len(plan.inputs)} requests (rate {rate}, burstiness {args.burstiness}, "
        f"max concurrency {args.max_concurrency})"
    )
    result = run_load(plan.inputs, plan.load)
    metrics = calculate_metrics(
        result.outputs,
        result.duration,
        result.start,
        plan.percentiles,
        plan.count_tokens,
        plan.info.goodput_slo_ms or None,
    )
    print(format_summary(plan.info, metrics, plan.selected))
    data = build_result(plan.info, metrics, result.outputs, plan.selected, args.save_detailed)
    data.update(plan.metadata)
    _save(args, plan.info, data)
    if args.plot:
        from pdserve.bench.plots import write_plots  # matplotlib only when asked for

        for path in write_plots(metrics, result.outputs, result.start, Path(args.plot)):
            print(f"Wrote {path}")
    return 0 if metrics.completed else 1


def _save(args: argparse.Namespace, info: RunInfo, data: dict[str, Any]) -> None:
    if not (args.save_result or args.result_filename):
        return
    path = save_result(
        data, Path(args.result_dir) / (args.result_filename or default_filename(info))
    )
    print(f"Saved result to {path}")
