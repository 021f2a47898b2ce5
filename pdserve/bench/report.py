"""The result JSON (vLLM key names), the printed summary, and saving."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pdserve.bench.client import RequestOutput
from pdserve.bench.metrics import BenchmarkMetrics, percentile_key

TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


@dataclass(slots=True, frozen=True)
class RunInfo:
    """What was run, saved next to the metrics."""

    date: str
    backend: str  # "openai" or "openai-chat", as vLLM names them
    base_url: str
    endpoint: str
    model_id: str
    tokenizer_id: str | None
    num_prompts: int
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    goodput_slo_ms: dict[str, float]


def now_stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def latency_keys(m: BenchmarkMetrics, selected: tuple[str, ...]) -> dict[str, float]:
    keys: dict[str, float] = {}
    for name in selected:
        stats = m.latencies[name]
        keys[f"mean_{name}_ms"] = stats.mean
        keys[f"median_{name}_ms"] = stats.median
        keys[f"std_{name}_ms"] = stats.std
        for p, value in stats.percentiles.items():
            keys[f"{percentile_key(p)}_{name}_ms"] = value
    return keys


def run_keys(info: RunInfo) -> dict[str, Any]:
    rate = "inf" if math.isinf(info.request_rate) else info.request_rate
    return {
        "date": info.date,
        "backend": info.backend,
        "base_url": info.base_url,
        "endpoint": info.endpoint,
        "model_id": info.model_id,
        "tokenizer_id": info.tokenizer_id,
        "num_prompts": info.num_prompts,
        "request_rate": rate,
        "burstiness": info.burstiness,
        "max_concurrency": info.max_concurrency,
        "goodput_slo_ms": info.goodput_slo_ms or None,
    }


def detailed_keys(outputs: list[RequestOutput], m: BenchmarkMetrics) -> dict[str, Any]:
    return {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": m.output_lens,
        "ttfts": [o.ttft if o.success else 0.0 for o in outputs],
        "itls": [o.itl for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }


def build_result(
    info: RunInfo,
    m: BenchmarkMetrics,
    outputs: list[RequestOutput],
    selected: tuple[str, ...],
    detailed: bool,
) -> dict[str, Any]:
    result: dict[str, Any] = run_keys(info)
    result.update(
        duration=m.duration,
        completed=m.completed,
        failed=m.failed,
        total_input_tokens=m.total_input,
        total_output_tokens=m.total_output,
        request_throughput=m.request_throughput,
        request_goodput=m.request_goodput,
        output_throughput=m.output_throughput,
        total_token_throughput=m.total_token_throughput,
        max_output_tokens_per_s=m.max_output_tokens_per_s,
        max_concurrent_requests=m.max_concurrent_requests,
    )
    result.update(latency_keys(m, selected))
    if detailed:
        result.update(detailed_keys(outputs, m))
    else:
        result["errors"] = sorted({o.error for o in outputs if o.error})[:20]
    return result


def summary(info: RunInfo, m: BenchmarkMetrics, selected: tuple[str, ...]) -> str:
    row = "{:<40} {:<10}".format
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines.append(row("Successful requests:", m.completed))
    lines.append(row("Failed requests:", m.failed))
    if info.max_concurrency is not None:
        lines.append(row("Maximum request concurrency:", info.max_concurrency))
    lines.append(row("Benchmark duration (s):", f"{m.duration:.2f}"))
    lines.append(row("Total input tokens:", m.total_input))
    lines.append(row("Total generated tokens:", m.total_output))
    lines.append(row("Request throughput (req/s):", f"{m.request_throughput:.2f}"))
    if m.request_goodput is not None:
        lines.append(row("Request goodput (req/s):", f"{m.request_goodput:.2f}"))
    lines.append(row("Output token throughput (tok/s):", f"{m.output_throughput:.2f}"))
    lines.append(row("Peak output token throughput (tok/s):", f"{m.max_output_tokens_per_s:.2f}"))
    lines.append(row("Peak concurrent requests:", m.max_concurrent_requests))
    lines.append(row("Total Token throughput (tok/s):", f"{m.total_token_throughput:.2f}"))
    for name in selected:
        title, short = TITLES[name]
        stats = m.latencies[name]
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        lines.append(row(f"Mean {short} (ms):", f"{stats.mean:.2f}"))
        lines.append(row(f"Median {short} (ms):", f"{stats.median:.2f}"))
        for p, value in stats.percentiles.items():
            lines.append(row(f"{percentile_key(p).upper()} {short} (ms):", f"{value:.2f}"))
    lines.append("=" * 50)
    return "\n".join(lines)


def default_filename(info: RunInfo) -> str:
    """vLLM's pattern: {backend}-{rate}qps[-concurrency{N}]-{model}-{date}.json."""
    rate = "inf" if math.isinf(info.request_rate) else f"{info.request_rate:g}"
    conc = f"-concurrency{info.max_concurrency}" if info.max_concurrency is not None else ""
    model = Path(info.model_id).name or "model"
    return f"{info.backend}-{rate}qps{conc}-{model}-{info.date}.json"


def save_result(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path
