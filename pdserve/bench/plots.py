"""PNG plots of one benchmark run: latency CDFs, throughput and concurrency over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pdserve.bench.client import RequestOutput  # noqa: E402
from pdserve.bench.metrics import METRICS, BenchmarkMetrics  # noqa: E402
from pdserve.bench.report import TITLES  # noqa: E402


def _cdf(ax: plt.Axes, seconds: Sequence[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.grid(True, alpha=0.3)
    if not seconds:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    ms = np.sort(np.asarray(seconds, dtype=np.float64) * 1000.0)
    ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post")


def plot_latency_cdfs(m: BenchmarkMetrics, path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, name in zip(axes.flat, METRICS, strict=True):
        _cdf(ax, m.samples[name], f"{TITLES[name][1]} CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_throughput(m: BenchmarkMetrics, path: Path) -> Path:
    tokens = m.timeline.output_tokens_per_s
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(np.arange(len(tokens)), tokens, width=1.0, align="edge", alpha=0.7)
    ax.axhline(m.output_throughput, color="black", linestyle="--", label="mean over the run")
    ax.set_title("Output token throughput over time (one token per streamed chunk)")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("tokens / s")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def in_flight_steps(
    outputs: Sequence[RequestOutput], start: float
) -> tuple[list[float], list[int]]:
    """(times, requests in flight from that time on), one point per start or end event."""
    events = sorted(
        [(o.start_time - start, 1) for o in outputs]
        + [(o.start_time + o.latency - start, -1) for o in outputs]
    )
    times, counts, level = [0.0], [0], 0
    for t, step in events:
        level += step
        times.append(t)
        counts.append(level)
    return times, counts


def plot_concurrency(outputs: Sequence[RequestOutput], start: float, path: Path) -> Path:
    times, counts = in_flight_steps(outputs, start)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.step(times, counts, where="post")
    ax.set_title("Requests in flight over time")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("requests")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(
    m: BenchmarkMetrics, outputs: Sequence[RequestOutput], start: float, out_dir: Path
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_cdfs(m, out_dir / "latency_cdf.png"),
        plot_throughput(m, out_dir / "throughput.png"),
        plot_concurrency(outputs, start, out_dir / "concurrency.png"),
    ]
