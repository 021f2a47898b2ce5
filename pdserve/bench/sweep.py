"""Request-rate sweep over deployments: `pdserve serve` clusters measured in one run.

    python -m pdserve.bench.sweep --model M --request-rates 1,2,4 \
        --deployments disagg,aggregated --num-prompts 40 --out-dir bench-results/sweep

Every deployment is started once (on free 127.0.0.1 ports) and kept up; rates are then run in
turn, each against every deployment, so slow drifts of a shared machine hit all of them alike.
Writes one `pdserve bench serve` JSON per (deployment, rate), `sweep.json`, `sweep.md` (a table)
and `sweep.png` (TTFT p99 and ITL p99 against request rate).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pdserve.launcher import probe_http

# Deployment name -> extra `pdserve serve` flags.
DEPLOYMENTS: dict[str, tuple[str, ...]] = {
    "disagg": (),  # 1 prefill + 1 decode worker
    "aggregated": ("--aggregated",),  # 1 decode worker that prefills locally
    "disagg-1p2d": ("--num-decode", "2"),
}
READY_TIMEOUT_S = 900.0
TABLE_KEYS = (
    "completed", "failed", "request_throughput", "output_throughput",
    "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
    "median_itl_ms", "p99_itl_ms", "p99_e2el_ms",
)  # fmt: skip


@dataclass(slots=True)
class Deployment:
    name: str
    base_url: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass(slots=True, frozen=True)
class SweepRow:
    deployment: str
    request_rate: float
    result_file: str
    metrics: dict[str, float | int | None]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_deployment(name: str, serve_args: Sequence[str], out_dir: Path) -> Deployment:
    http, grpc_port, prefill, decode = free_ports(4)
    argv = [sys.executable, "-m", "pdserve.cli", "serve", *serve_args, *DEPLOYMENTS[name],
            "--port", str(http), "--grpc-port", str(grpc_port), "--prefill-port", str(prefill),
            "--decode-port", str(decode)]  # fmt: skip
    log = out_dir / f"serve-{name}.log"
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Deployment(name, f"http://127.0.0.1:{http}", proc, log)


def wait_ready(dep: Deployment, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe_http(f"{dep.base_url}/health"):
        if dep.proc.poll() is not None:
            raise RuntimeError(f"{dep.name}: pdserve serve exited; see {dep.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dep.name}: not healthy after {timeout_s:.0f}s; see {dep.log}")
        time.sleep(1.0)


def stop_deployment(dep: Deployment, timeout_s: float = 120.0) -> None:
    if dep.proc.poll() is None:
        dep.proc.send_signal(signal.SIGTERM)  # pdserve serve drains and stops its children
        try:
            dep.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            dep.proc.kill()
            dep.proc.wait()


def run_bench(dep: Deployment, rate: float, bench_args: Sequence[str], out_dir: Path) -> SweepRow:
    name = f"{dep.name}-rate{rate:g}.json"
    argv = [sys.executable, "-m", "pdserve.cli", "bench", "serve", "--base-url", dep.base_url,
            "--request-rate", f"{rate:g}", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
            *bench_args]  # fmt: skip
    with (out_dir / f"{dep.name}-rate{rate:g}.log").open("wb") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(
            f"bench against {dep.name} at {rate:g} req/s failed (rc {done.returncode})"
        )
    result = json.loads((out_dir / name).read_text())
    return SweepRow(dep.name, rate, name, {k: result.get(k) for k in TABLE_KEYS})


def markdown_table(rows: Sequence[SweepRow]) -> str:
    head = ["deployment", "req/s offered", *TABLE_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.deployment, f"{row.request_rate:g}"]
        for key in TABLE_KEYS:
            value = row.metrics.get(key)
            cells.append(
                "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[SweepRow], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "p99_ttft_ms", "TTFT p99"),
        (axes[1], "p99_itl_ms", "ITL p99"),
    ):
        for name in dict.fromkeys(r.deployment for r in rows):
            mine = [r for r in rows if r.deployment == name]
            ax.plot(
                [r.request_rate for r in mine], [r.metrics[key] for r in mine], "o-", label=name
            )
        ax.set_title(f"{title} vs request rate")
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep(args: argparse.Namespace) -> list[SweepRow]:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deployments = [start_deployment(n, args.serve_args, out_dir) for n in args.deployments]
    rows = []
    try:
        for dep in deployments:
            wait_ready(dep, args.ready_timeout)
            print(f"{dep.name} ready at {dep.base_url}", flush=True)
        base_seed = _base_seed(args.bench_args)
        for i, rate in enumerate(args.request_rates):
            # A fresh seed per rate: each cluster lives through every rate, and reusing the
            # prompts of the previous point would turn its prefills into prefix-cache hits.
            bench_args = [*args.bench_args, "--seed", str(base_seed + i)]
            for dep in deployments:
                print(f"{dep.name}: {rate:g} req/s ...", flush=True)
                rows.append(run_bench(dep, rate, bench_args, out_dir))
    finally:
        for dep in deployments:
            stop_deployment(dep)
    return rows


def _base_seed(bench_args: Sequence[str]) -> int:
    """The --seed given for the bench runs (the last one wins, as argparse does), else 0."""
    seed = 0
    for flag, value in zip(bench_args, bench_args[1:], strict=False):
        if flag == "--seed":
            seed = int(value)
    return seed


def _csv(kind: type, text: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None


def add_parser(p: argparse.ArgumentParser) -> None:
    """The sweep's flags (the `pdserve` CLI convention: `add_parser` + `run`)."""
    p.add_argument("--request-rates", type=lambda t: _csv(float, t), default=[1.0, 2.0, 4.0])
    p.add_argument("--deployments", type=lambda t: _csv(str, t), default=["disagg", "aggregated"])
    p.add_argument("--out-dir", default=None, help="default bench-results/sweep-<date>")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S)
    p.add_argument("--serve-args", default="", help="extra `pdserve serve` flags, one string")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="after --: flags for every `pdserve bench serve` run")  # fmt: skip


def _normalize(args: argparse.Namespace) -> None:
    unknown = [d for d in args.deployments if d not in DEPLOYMENTS]
    if unknown:
        raise ValueError(f"unknown deployments {unknown}; choose from {sorted(DEPLOYMENTS)}")
    args.out_dir = args.out_dir or f"bench-results/sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    if isinstance(args.serve_args, str):
        args.serve_args = args.serve_args.split()
    if args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_parser(parser)
    args = parser.parse_args(argv)
    try:
        _normalize(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run(args: argparse.Namespace) -> int:
    try:
        _normalize(args)
        rows = sweep(args)
    except (ValueError, RuntimeError) as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 1
    out_dir = Path(args.out_dir)
    table = markdown_table(rows)
    (out_dir / "sweep.md").write_text(table + "\n")
    (out_dir / "sweep.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(table)
    png = plot(rows, out_dir / "sweep.png")
    print(f"wrote {out_dir / 'sweep.md'}, {out_dir / 'sweep.json'}, {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
