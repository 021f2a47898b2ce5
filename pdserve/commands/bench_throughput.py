"""`pdserve bench throughput`: offline throughput of the engine, against transformers.

Like `vllm bench throughput`: N synthetic requests with seeded random prompt lengths (random
token ids drawn from the vocabulary, special tokens excluded) and output lengths (EOS ignored,
so every request produces exactly its output length) go through `LLM.generate` at once.

In the same process run, so that ratios hold on a noisy machine, it can also run transformers'
`generate` on the same prompts (`--baseline hf`: one request at a time; `--baseline hf-batch`:
static, left-padded batches), measure the machine's fp32 matmul peak, and measure the engine's
pure decode rate at a fixed batch as a fraction of that peak (2 x params FLOPs per token).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

BASELINES = ("hf", "hf-batch")
DEFAULT_OUTPUT_JSON = "results/bench_throughput.json"


@dataclass(slots=True, frozen=True)
class BenchRequest:
    """One synthetic request: the prompt's token ids and how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int


@dataclass(slots=True, frozen=True)
class RunResult:
    """Throughput of one system on a list of requests (model loading excluded)."""

    name: str
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    requests_per_s: float = field(init=False)
    output_tokens_per_s: float = field(init=False)
    total_tokens_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        elapsed = max(self.elapsed_s, 1e-9)
        object.__setattr__(self, "requests_per_s", self.num_requests / elapsed)
        object.__setattr__(self, "output_tokens_per_s", self.output_tokens / elapsed)
        total = self.prompt_tokens + self.output_tokens
        object.__setattr__(self, "total_tokens_per_s", total / elapsed)


@dataclass(slots=True, frozen=True)
class DecodeRate:
    """Engine decode throughput when every sequence of the batch is decoding."""

    batch_size: int
    num_steps: int
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    num_params: int
    achieved_gflops: float  # 2 * num_params * tokens_per_s / 1e9
    peak_fraction: float | None = None  # achieved_gflops / matmul peak


@dataclass(slots=True, frozen=True)
class BenchConfig:
    """What to run; validated at construction."""

    num_prompts: int = 64
    input_len_range: tuple[int, int] = (32, 512)
    output_len_range: tuple[int, int] = (16, 256)
    seed: int = 0
    baselines: tuple[str, ...] = ()
    baseline_num_prompts: int = 16  # baselines are slow: they run on the first K prompts
    hf_batch_size: int = 16
    peak_matmul_size: int = 2048
    decode_batch_size: int = 64
    decode_steps: int = 32

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        _check_range("input_len_range", self.input_len_range)
        _check_range("output_len_range", self.output_len_range)
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {BASELINES}")
        if self.baseline_num_prompts < 1:
            raise ValueError(f"baseline_num_prompts must be >= 1, got {self.baseline_num_prompts}")
        for name in ("hf_batch_size", "peak_matmul_size", "decode_batch_size", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_baseline_prompts(self) -> int:
        return min(self.num_prompts, self.baseline_num_prompts)


# ---------------------------------------------------------------------------------------------
# CLI


def add_parser(parser: argparse.ArgumentParser) -> None:
    from engine.cli_args import add_engine_args
    from pdserve.commands.convert import add_cache_dir_arg

    add_engine_args(parser)  # includes --seed, which also seeds the synthetic dataset
    add_cache_dir_arg(parser)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--input-len-range", type=_parse_range, default=(32, 512), metavar="MIN:MAX")
    g.add_argument("--output-len-range", type=_parse_range, default=(16, 256), metavar="MIN:MAX")
    g.add_argument(
        "--baseline",
        action="append",
        default=[],
        help=f"transformers baseline(s) to run too: {', '.join(BASELINES)} (repeat or comma list)",
    )
    g.add_argument(
        "--baseline-num-prompts",
        type=int,
        default=16,
        help="run the baselines (and the engine once more) on the first K prompts (default 16)",
    )
    g.add_argument("--hf-batch-size", type=int, default=16)
    g.add_argument("--peak-matmul-size", type=int, default=2048)
    g.add_argument("--decode-batch-size", type=int, default=64)
    g.add_argument("--decode-steps", type=int, default=32)
    g.add_argument("--no-peak", action="store_true", help="skip the matmul peak + decode rate")
    g.add_argument("--output-json", default=DEFAULT_OUTPUT_JSON)


def run(args: argparse.Namespace) -> int:
    import torch

    from engine.cli_args import engine_config_from_args
    from pdserve.default_model import resolve_model

    if args.num_threads is not None:  # the engine flag; the baselines and the peak use it too
        torch.set_num_threads(args.num_threads)
    bench = _bench_config_from_args(args)
    args.model = str(resolve_model(args.model, args.cache_dir))
    engine_config = engine_config_from_args(args)
    report = run_benchmark(engine_config, bench, measure_peak=not args.no_peak)
    print_report(report)
    write_json(report, Path(args.output_json))
    print(f"wrote {args.output_json}")
    return 0


def _bench_config_from_args(args: argparse.Namespace) -> BenchConfig:
    baselines = tuple(b.strip() for item in args.baseline for b in item.split(",") if b.strip())
    return BenchConfig(
        num_prompts=args.num_prompts,
        input_len_range=args.input_len_range,
        output_len_range=args.output_len_range,
        seed=args.seed,
        baselines=tuple(dict.fromkeys(baselines)),
        baseline_num_prompts=args.baseline_num_prompts,
        hf_batch_size=args.hf_batch_size,
        peak_matmul_size=args.peak_matmul_size,
        decode_batch_size=args.decode_batch_size,
        decode_steps=args.decode_steps,
    )


def _parse_range(text: str) -> tuple[int, int]:
    """'32:512' (or '32-512', '32,512') -> (32, 512)."""
    for sep in (":", "-", ","):
        if sep in text:
            low, _, high = text.partition(sep)
            try:
                return int(low), int(high)
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}")


def _check_range(name: str, value: tuple[int, int]) -> None:
    low, high = value
    if low < 1 or high < low:
        raise ValueError(f"{name} must satisfy 1 <= min <= max, got {value}")


# ---------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(engine_config: Any, bench: BenchConfig, measure_peak: bool = True) -> dict:
    """Run everything `bench` asks for on `engine_config.model`; return the JSON-ready report."""
    import torch

    if measure_peak and bench.decode_batch_size > engine_config.max_num_seqs:
        raise ValueError(
            f"decode_batch_size ({bench.decode_batch_size}) exceeds max_num_seqs "
            f"({engine_config.max_num_seqs}): the batch could never decode all at once"
        )
    model_dir = Path(engine_config.model)
    tokenizer = _load_tokenizer(model_dir)
    requests = make_requests(tokenizer, bench)
    subset = requests[: bench.num_baseline_prompts]
    llm = _make_llm(engine_config)
    _say(f"engine: {len(requests)} requests, {sum(r.output_len for r in requests)} output tokens")
    engine = _announce(run_engine(llm, requests, "engine"))
    runs: dict[str, RunResult] = {}
    if bench.baselines and len(subset) < len(requests):
        _clear_prefix_cache(llm)  # the subset must not reuse the full run's KV blocks
        runs["engine-subset"] = _announce(run_engine(llm, subset, "engine-subset"))
    peaks, decode = measure_decode_vs_peak(llm, tokenizer, bench) if measure_peak else ([], None)
    del llm  # free the KV pool before loading transformers' copy of the model
    runs.update(run_baselines(model_dir, subset, bench, tokenizer))
    return _build_report(bench, engine_config, engine, runs, peaks, decode, torch.get_num_threads())


def make_requests(tokenizer: Any, bench: BenchConfig) -> list[BenchRequest]:
    """Seeded synthetic requests: random non-special token ids, random in/out lengths."""
    rng = random.Random(bench.seed)
    vocab = _plain_token_ids(tokenizer)
    requests = []
    for _ in range(bench.num_prompts):
        input_len = rng.randint(*bench.input_len_range)
        output_len = rng.randint(*bench.output_len_range)
        prompt = [rng.choice(vocab) for _ in range(input_len)]
        requests.append(BenchRequest(prompt, output_len))
    return requests


def _plain_token_ids(tokenizer: Any) -> list[int]:
    """Vocabulary ids that are neither special nor added tokens (BOS/EOS/ChatML markers...)."""
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = [i for i in range(len(tokenizer)) if i not in excluded]
    if not ids:
        raise ValueError("the tokenizer has no non-special tokens to build prompts from")
    return ids


# ---------------------------------------------------------------------------------------------
# Engine


def _make_llm(engine_config: Any) -> Any:
    from dataclasses import fields

    from engine.llm import LLM

    options = {f.name: getattr(engine_config, f.name) for f in fields(engine_config)}
    return LLM(**options)


def _clear_prefix_cache(llm: Any) -> None:
    """Forget cached prefix blocks so a repeated prompt is computed again (engine is idle)."""
    if llm.engine.has_unfinished_requests():
        raise RuntimeError("the prefix cache can only be cleared while the engine is idle")
    llm.reset_prefix_cache()


def run_engine(llm: Any, requests: Sequence[BenchRequest], name: str) -> RunResult:
    """All requests through one `LLM.generate` call; checks every output has its length."""
    from engine.sampling_params import SamplingParams

    params = [
        SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests
    ]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    wanted = [r.output_len for r in requests]
    if produced != wanted:
        raise RuntimeError(f"engine produced output lengths {produced}, expected {wanted}")
    return _result(name, requests, elapsed)


def measure_decode_vs_peak(
    llm: Any, tokenizer: Any, bench: BenchConfig
) -> tuple[list[float], DecodeRate]:
    """Matmul peak samples taken right before and after the decode-rate run, and the decode
    rate as a fraction of the best sample (on a shared machine one sample may land in a busy
    moment; the best one is the closest to what the machine can do)."""
    peaks = [measure_matmul_peak(bench.peak_matmul_size)]
    _say(f"fp32 matmul peak: {peaks[0]:.1f} GFLOP/s; measuring the decode rate")
    decode = measure_decode_rate(llm, tokenizer, bench, llm.engine.num_params)
    peaks.append(measure_matmul_peak(bench.peak_matmul_size))
    return peaks, replace(decode, peak_fraction=decode.achieved_gflops / max(peaks))


def measure_decode_rate(
    llm: Any, tokenizer: Any, bench: BenchConfig, num_params: int
) -> DecodeRate:
    """Decode tokens/s with `decode_batch_size` sequences all decoding (prefill steps excluded).

    Short prompts are admitted together; timing starts after the first step in which every
    sequence has produced a token (from then on each step is one decode token per sequence)
    and covers `decode_steps` steps.
    """
    from engine.sampling_params import SamplingParams

    engine = llm.engine
    rng = random.Random(bench.seed + 1)
    vocab = _plain_token_ids(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=bench.decode_steps + 2, ignore_eos=True)
    ids = [f"decode-rate-{i}" for i in range(bench.decode_batch_size)]
    for request_id in ids:
        engine.add_request(request_id, [rng.choice(vocab) for _ in range(8)], params)
    started: set[str] = set()
    while len(started) < len(ids) and engine.has_unfinished_requests():
        started.update(o.request_id for o in engine.step() if o.new_token_ids)
    tokens, steps, start = 0, 0, time.perf_counter()
    while steps < bench.decode_steps and engine.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    elapsed = time.perf_counter() - start
    for request_id in ids:
        engine.abort_request(request_id)
    rate = tokens / max(elapsed, 1e-9)
    achieved = 2 * num_params * rate / 1e9
    return DecodeRate(
        batch_size=len(ids),
        num_steps=steps,
        tokens=tokens,
        elapsed_s=elapsed,
        tokens_per_s=rate,
        num_params=num_params,
        achieved_gflops=achieved,
    )


# ---------------------------------------------------------------------------------------------
# transformers baselines


def run_baselines(
    model_dir: Path, requests: Sequence[BenchRequest], bench: BenchConfig, tokenizer: Any
) -> dict[str, RunResult]:
    """Run each asked-for transformers baseline on `requests` with one loaded model."""
    if not bench.baselines:
        return {}
    model = _load_hf_model(model_dir)
    pad_id = _pad_token_id(tokenizer, model)
    runners: dict[str, Callable[[], RunResult]] = {
        "hf": lambda: run_hf_sequential(model, requests),
        "hf-batch": lambda: run_hf_batched(model, requests, bench.hf_batch_size, pad_id),
    }
    results = {}
    for name in bench.baselines:
        _say(f"baseline {name}: {len(requests)} requests")
        results[name] = _announce(runners[name]())
    return results


def run_hf_sequential(model: Any, requests: Sequence[BenchRequest]) -> RunResult:
    """transformers `generate`, greedy, one request at a time."""
    import torch
    from tqdm import tqdm

    start = time.perf_counter()
    for r in tqdm(requests, desc="hf", file=sys.stderr):
        input_ids = torch.tensor([r.prompt_token_ids])  # (1, T)
        _hf_generate(model, input_ids, torch.ones_like(input_ids), r.output_len, pad_id=None)
    return _result("hf", requests, time.perf_counter() - start)


def run_hf_batched(
    model: Any, requests: Sequence[BenchRequest], batch_size: int, pad_id: int
) -> RunResult:
    """transformers `generate`, greedy, static left-padded batches in arrival order.

    A static batch runs until its longest request is done, so it generates
    `max(output_len) * batch` tokens; only the requested tokens are counted as output.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    for first in tqdm(range(0, len(requests), batch_size), desc="hf-batch", file=sys.stderr):
        batch = requests[first : first + batch_size]
        input_ids, attention_mask = left_pad([r.prompt_token_ids for r in batch], pad_id)
        out_len = max(r.output_len for r in batch)
        _hf_generate(model, input_ids, attention_mask, out_len, pad_id=pad_id)
    return _result("hf-batch", requests, time.perf_counter() - start)


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Left-pad token id lists into `(B, T_max)` input ids and attention mask tensors."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T_max)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def _hf_generate(
    model: Any, input_ids: Any, attention_mask: Any, out_len: int, pad_id: int | None
) -> Any:
    import torch

    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=out_len,
            min_new_tokens=out_len,
            pad_token_id=pad_id if pad_id is not None else model.generation_config.pad_token_id,
        )
    if output.shape[1] != input_ids.shape[1] + out_len:
        raise RuntimeError(f"transformers generated {output.shape[1] - input_ids.shape[1]} tokens")
    return output


def _load_hf_model(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _pad_token_id(tokenizer: Any, model: Any) -> int:
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id):
        if candidate is not None:
            return int(candidate)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return int(eos)


# ---------------------------------------------------------------------------------------------
# Machine peak


def measure_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` fp32 GFLOP/s of an (n x n) @ (n x n) matmul (after one warm-up)."""
    import torch

    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------------------------
# Report


def _say(message: str) -> None:
    """Progress line on stderr (the report itself goes to stdout)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _announce(result: RunResult) -> RunResult:
    _say(f"{result.name}: {result.elapsed_s:.1f}s, {result.output_tokens_per_s:.1f} output tok/s")
    return result


def _result(name: str, requests: Sequence[BenchRequest], elapsed: float) -> RunResult:
    return RunResult(
        name=name,
        num_requests=len(requests),
        prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        output_tokens=sum(r.output_len for r in requests),
        elapsed_s=elapsed,
    )


def _build_report(
    bench: BenchConfig,
    engine_config: Any,
    engine: RunResult,
    runs: dict[str, RunResult],
    peaks: list[float],
    decode: DecodeRate | None,
    num_threads: int,
) -> dict:
    engine_on_subset = runs.get("engine-subset", engine)
    ratios = {
        name: {
            "engine_vs_baseline_output_tok_s": engine.output_tokens_per_s / run.output_tokens_per_s,
            "engine_same_prompts_vs_baseline_output_tok_s": engine_on_subset.output_tokens_per_s
            / run.output_tokens_per_s,
        }
        for name, run in runs.items()
        if name in BASELINES
    }
    return {
        "model": str(engine_config.model),
        "num_requests": engine.num_requests,
        "elapsed_time": engine.elapsed_s,
        "total_num_tokens": engine.prompt_tokens + engine.output_tokens,
        "total_output_tokens": engine.output_tokens,
        "requests_per_second": engine.requests_per_s,
        "output_tokens_per_second": engine.output_tokens_per_s,
        "tokens_per_second": engine.total_tokens_per_s,
        "engine": asdict(engine),
        "baselines": {name: asdict(run) for name, run in runs.items()},
        "ratios": ratios,
        "matmul_peak_gflops": max(peaks) if peaks else None,
        "matmul_peak_samples_gflops": peaks,
        "decode": asdict(decode) if decode is not None else None,
        "config": asdict(bench),
        "machine": {
            "load_average_1m_5m_15m": list(os.getloadavg()),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": num_threads,
        },
    }


def print_report(report: dict) -> None:
    """Human-readable summary of `report` on stdout."""
    machine = report["machine"]
    print(f"model: {report['model']}")
    print(
        f"torch threads: {machine['torch_threads']}, load average: "
        + ", ".join(f"{x:.2f}" for x in machine["load_average_1m_5m_15m"])
    )
    for name, run in [("engine", report["engine"]), *report["baselines"].items()]:
        print(
            f"{name:>14}: {run['num_requests']} requests in {run['elapsed_s']:.2f}s | "
            f"{run['requests_per_s']:.2f} req/s | {run['output_tokens_per_s']:.1f} output tok/s | "
            f"{run['total_tokens_per_s']:.1f} total tok/s"
        )
    for name, ratio in report["ratios"].items():
        print(
            f"engine / {name}: {ratio['engine_vs_baseline_output_tok_s']:.2f}x output tok/s "
            f"({ratio['engine_same_prompts_vs_baseline_output_tok_s']:.2f}x on the same prompts)"
        )
    if report["matmul_peak_gflops"] is not None:
        samples = ", ".join(f"{x:.1f}" for x in report["matmul_peak_samples_gflops"])
        print(f"fp32 matmul peak: {report['matmul_peak_gflops']:.1f} GFLOP/s (samples {samples})")
    decode = report["decode"]
    if decode is not None:
        print(
            f"decode at batch {decode['batch_size']}: {decode['tokens_per_s']:.1f} tok/s = "
            f"{decode['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * decode['peak_fraction']:.1f}% of matmul peak"
        )


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
