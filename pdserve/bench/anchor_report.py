"""`pdserve bench compare`'s output: one JSON with every figure and ratio, a table, one plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdserve.bench.anchor import Workload
from pdserve.bench.compare import advantage

SCHEMA = "pdserve-bench-compare/1"
RATIO_DEFINITION = (
    "ratio = how many times better a pdserve target is than the baseline on that figure, "
    "oriented so that > 1 means pdserve is better: baseline / pdserve for latencies (lower is "
    "better), pdserve / baseline for throughputs (higher is better)"
)

# results: {target label: {workload name: `pdserve bench serve` result dict}}
Results = dict[str, dict[str, dict[str, Any]]]


def summary_rows(
    workloads: Sequence[Workload], baseline: str, targets: Sequence[str], results: Results
) -> list[dict[str, Any]]:
    """One row per (workload, headline figure): each side's value and each target's ratio."""
    rows = []
    for w in workloads:
        for fig in w.figures:
            values = {
                label: results.get(label, {}).get(w.name, {}).get(fig.key)
                for label in (baseline, *targets)
            }
            failed = {
                label: results.get(label, {}).get(w.name, {}).get("failed")
                for label in (baseline, *targets)
            }
            ratios = {
                label: advantage(values[label], values[baseline], fig.higher_is_better)
                for label in targets
            }
            rows.append({
                "workload": w.name, "description": w.description, "figure": fig.key,
                "label": fig.label, "higher_is_better": fig.higher_is_better,
                "values": values, "ratios": ratios, "failed": failed,
            })  # fmt: skip
    return rows


def build_report(
    workloads: Sequence[Workload],
    baseline: str,
    targets: Sequence[str],
    results: Results,
    run: dict[str, Any],
) -> dict[str, Any]:
    """The JSON document: what ran (`run`), each workload's full results, the headline table."""
    return {
        "schema": SCHEMA,
        **run,
        "baseline": baseline,
        "targets": list(targets),
        "ratio_definition": RATIO_DEFINITION,
        "summary": summary_rows(workloads, baseline, targets, results),
        "workloads": [
            {
                **asdict(w),
                "description": w.description,
                "results": {label: results[label].get(w.name) for label in results},
            }
            for w in workloads
        ],
    }


def failed_requests(report: dict[str, Any]) -> dict[str, int]:
    """Failed requests per target over the whole run (only targets with failures)."""
    totals: dict[str, int] = {}
    for w in report["workloads"]:
        for label, result in w["results"].items():
            if result and result.get("failed"):
                totals[label] = totals.get(label, 0) + int(result["failed"])
    return totals


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio_cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def markdown_table(report: dict[str, Any]) -> str:
    baseline, targets = report["baseline"], report["targets"]
    head = ["workload", "figure", baseline, *targets, *(f"{t} ratio" for t in targets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["summary"]:
        cells = [row["description"], row["label"]]
        cells += [_cell(row["values"][label]) for label in (baseline, *targets)]
        cells += [_ratio_cell(row["ratios"][t]) for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + RATIO_DEFINITION


def write_plot(report: dict[str, Any], path: Path) -> Path:
    """One bar chart per headline figure, each target's bar labelled with its ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    labels = [report["baseline"], *report["targets"]]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4.2), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        values = [row["values"][label] or 0.0 for label in labels]
        bars = ax.bar(range(len(labels)), values, color=["grey", *["C0"] * len(report["targets"])])
        for bar, label in zip(bars[1:], report["targets"], strict=True):
            r = row["ratios"][label]
            text = "-" if r is None else f"{r:.2f}x"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom")  # fmt: skip
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        better = "higher" if row["higher_is_better"] else "lower"
        ax.set_title(f"{row['workload']}: {row['label']}\n({better} is better)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("pdserve vs baseline, same run (ratio > 1: pdserve better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "compare.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path = out_dir / "compare.md"
    md_path.write_text(markdown_table(report) + "\n", encoding="utf-8")
    return [json_path, md_path, write_plot(report, out_dir / "compare.png")]
