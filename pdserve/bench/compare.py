"""Compare saved `pdserve bench serve` results: one table, ratios against the first file.

python -m pdserve.bench.compare pdserve.json llamacpp.json [--labels pdserve,llama.cpp]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

# (key, label, higher_is_better)
ROWS: tuple[tuple[str, str, bool], ...] = (
    ("completed", "completed requests", True),
    ("failed", "failed requests", False),
    ("request_throughput", "requests/s", True),
    ("output_throughput", "output tok/s", True),
    ("total_token_throughput", "total tok/s", True),
    ("request_goodput", "goodput req/s", True),
    ("mean_ttft_ms", "TTFT mean (ms)", False),
    ("p99_ttft_ms", "TTFT p99 (ms)", False),
    ("mean_tpot_ms", "TPOT mean (ms)", False),
    ("p99_tpot_ms", "TPOT p99 (ms)", False),
    ("mean_itl_ms", "ITL mean (ms)", False),
    ("p99_itl_ms", "ITL p99 (ms)", False),
    ("mean_e2el_ms", "E2EL mean (ms)", False),
    ("p99_e2el_ms", "E2EL p99 (ms)", False),
)


def load(paths: Sequence[Path]) -> list[dict]:
    results = []
    for path in paths:
        try:
            results.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read a result from {path}: {exc}") from None
    return results


def advantage(value: float | None, base: float | None, higher_is_better: bool) -> float | None:
    """How many times better `value` is than `base`: > 1 means better, whichever way is better.

    value / base for a figure where higher is better (throughput), base / value where lower is
    better (latency). None when either is missing or the divisor is 0.
    """
    if value is None or base is None:
        return None
    num, den = (value, base) if higher_is_better else (base, value)
    return None if den == 0 else num / den


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def table(labels: Sequence[str], results: Sequence[dict]) -> str:
    """Rows of metrics, a column per result, then each result's ratio to the first one."""
    head = ["metric", *labels, *(f"{lab}/{labels[0]}" for lab in labels[1:])]
    lines = [head]
    for key, name, _ in ROWS:
        values = [r.get(key) for r in results]
        if all(v is None for v in values):
            continue
        cells = [
            "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in values
        ]
        lines.append([name, *cells, *(ratio(v, values[0]) for v in values[1:])])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--labels", default=None, help="comma-separated names, one per file")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [p.stem for p in args.results]
    if len(labels) != len(args.results):
        parser.error(f"{len(labels)} labels for {len(args.results)} result files")
    try:
        print(table(labels, load(args.results)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
