"""`pdserve bench compare`: the same workloads against a baseline server and pdserve, in one run.

    pdserve bench compare --baseline-url http://127.0.0.1:8080 --output-dir bench-results/cmp

The baseline (e.g. llama.cpp's llama-server on the same weights) runs first, then every pdserve
target: by default a fresh `pdserve serve` cluster per deployment (`--deployments
disagg,aggregated`), started on free ports, measured and stopped before the next one starts, so
no target sees another's prefix cache or CPU load; `--pdserve-url` measures a running cluster
instead. Writes compare.json (every figure and ratio), compare.md and compare.png, and exits 1
when any request failed (the files are still written: their `errors` say why).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from pdserve.bench.anchor import (
    WORKLOAD_NAMES,
    Endpoint,
    Workload,
    build_prompts,
    measure_endpoint,
    select_workloads,
)
from pdserve.bench.anchor_report import (
    Results,
    build_report,
    failed_requests,
    markdown_table,
    save_report,
)
from pdserve.bench.sweep import DEPLOYMENTS, start_deployment, stop_deployment, wait_ready

CACHE_POLICY = (
    "Every target gets the same prompts and request bodies. Workloads use disjoint prompts "
    "(seed + workload offset), and a warm-up request unrelated to them runs first. Each pdserve "
    "deployment is a fresh cluster (prefix caching on, its default), so nothing is cached across "
    "targets. Request bodies carry llama.cpp's cache_prompt: false, except in shared-prefix "
    "(true: reusing the shared prefix is the point, as pdserve's prefix cache does); pdserve "
    "ignores the field. Before each workload the baseline's slots are erased through "
    "/slots/{id}?action=erase when it allows that (llama-server --slot-save-path); slots_erased "
    "in each result says whether it happened (null: not possible). llama-server's host-memory "
    "prompt cache (--cache-ram) can only be turned off where it is started (--cache-ram 0)."
)


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_parser(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("baseline")
    b.add_argument("--baseline-url", required=True, help="e.g. http://127.0.0.1:8080")
    b.add_argument("--baseline-label", default="llama.cpp")
    t = p.add_argument_group("pdserve")
    t.add_argument("--pdserve-url", default=None,
                   help="measure this running cluster instead of starting clusters")  # fmt: skip
    t.add_argument("--deployments", type=_csv, default=["disagg", "aggregated"],
                   help=f"clusters to start, comma-separated, of {sorted(DEPLOYMENTS)}")  # fmt: skip
    t.add_argument("--model", default=None,
                   help="HF folder for the started clusters and the tokenizer (default model)")  # fmt: skip
    t.add_argument("--serve-args", default="", help="extra `pdserve serve` flags, one string")
    t.add_argument("--ready-timeout", type=float, default=900.0)
    w = p.add_argument_group("workloads")
    w.add_argument("--workloads", type=_csv, default=list(WORKLOAD_NAMES),
                   help=f"comma-separated, of {list(WORKLOAD_NAMES)}")  # fmt: skip
    w.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="WORKLOAD.FIELD=INT", help="e.g. single.num_requests=3 (repeatable)")  # fmt: skip
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--tokenizer", default=None, help="HF folder (default: the model's)")
    w.add_argument("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY)")
    w.add_argument("--output-dir", default=None, help="default bench-results/compare-<date>")


def _normalize(args: argparse.Namespace) -> None:
    unknown = [d for d in args.deployments if d not in DEPLOYMENTS]
    if unknown:
        raise ValueError(f"unknown deployments {unknown}; choose from {sorted(DEPLOYMENTS)}")
    if not args.deployments and args.pdserve_url is None:
        raise ValueError("nothing to compare: give --deployments or --pdserve-url")
    args.baseline_url = args.baseline_url.rstrip("/")
    args.pdserve_url = args.pdserve_url.rstrip("/") if args.pdserve_url else None
    args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    args.serve_args = args.serve_args.split() if isinstance(args.serve_args, str) else []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.output_dir = Path(args.output_dir or f"bench-results/compare-{stamp}")


def run(args: argparse.Namespace) -> int:
    try:
        _normalize(args)
        workloads = select_workloads(args.workloads, args.overrides)
        report = compare(args, workloads)
    except (ValueError, RuntimeError) as exc:
        print(f"pdserve bench compare: error: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(report))
    for path in save_report(report, args.output_dir):
        print(f"wrote {path}")
    failed = failed_requests(report)
    if failed:  # figures over fewer requests than asked: not a clean comparison
        print(f"pdserve bench compare: failed requests {failed}; see the errors in the JSON",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def compare(args: argparse.Namespace, workloads: list[Workload]) -> dict[str, Any]:
    model = _model_folder(args)
    tokenizer_dir = args.tokenizer or model
    from transformers import AutoTokenizer  # heavy: after the flags are checked

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = {w.name: build_prompts(w, tokenizer, args.seed) for w in workloads}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    baseline = Endpoint(args.baseline_label, args.baseline_url, args.api_key)
    print(f"baseline {baseline.label} at {baseline.base_url}", flush=True)
    results: Results = {baseline.label: measure_endpoint(baseline, workloads, prompts)}
    for label, ep_context in _pdserve_targets(args, model):
        with ep_context as ep:
            results[label] = measure_endpoint(ep, workloads, prompts)
    run_info = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "flags": _flags(args),
        "git": _git_state(),
        "model": str(model),
        "tokenizer": str(tokenizer_dir),
        "seed": args.seed,
        "baseline_url": args.baseline_url,
        "baseline_props": _llamacpp_props(baseline),
        "pdserve_url": args.pdserve_url,
        "serve_args": args.serve_args,
        "sampling": {"temperature": 0.0, "ignore_eos": True, "endpoint": "/v1/completions",
                     "stream": True},
        "cache_policy": CACHE_POLICY,
        "cpu_count": os.cpu_count(),
    }  # fmt: skip
    targets = [label for label in results if label != baseline.label]
    return build_report(workloads, baseline.label, targets, results, run_info)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags, as JSON values (what to pass again to repeat the run)."""
    flags = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    flags.pop("api_key", None)
    return {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}


def _model_folder(args: argparse.Namespace) -> Path:
    from pdserve.default_model import resolve_model  # converts the default model on first use

    return resolve_model(args.model)


def _pdserve_targets(args: argparse.Namespace, model: Path) -> Iterator[tuple[str, Any]]:
    """(label, context manager giving an Endpoint) per pdserve target, started lazily in turn."""
    if args.pdserve_url is not None:
        yield "pdserve", _running(Endpoint("pdserve", args.pdserve_url, args.api_key))
        return
    serve_args = ["--model", str(model), *args.serve_args]
    for name in args.deployments:
        label = f"pdserve-{name}"
        yield label, _started(label, name, serve_args, args)


@contextmanager
def _running(ep: Endpoint) -> Iterator[Endpoint]:
    yield ep


@contextmanager
def _started(label: str, name: str, serve_args: list[str], args: argparse.Namespace):  # noqa: ANN202
    print(f"starting {label}: pdserve serve {' '.join(serve_args + list(DEPLOYMENTS[name]))}",
          flush=True)  # fmt: skip
    dep = start_deployment(name, serve_args, args.output_dir)
    try:
        wait_ready(dep, args.ready_timeout)
        yield Endpoint(label, dep.base_url, args.api_key)
    finally:
        stop_deployment(dep)


def _git_state() -> dict[str, Any] | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()  # fmt: skip
        changed = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                                 text=True, check=True, timeout=10).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "changed_files": [line[3:] for line in changed]}


def _llamacpp_props(ep: Endpoint) -> dict[str, Any] | None:
    """What llama-server says about itself (build, slots, model); None for other servers."""
    try:
        resp = httpx.get(f"{ep.base_url}/props", timeout=10.0)
        if resp.status_code != 200:
            return None
        props = resp.json()
    except (httpx.HTTPError, ValueError):
        return None
    keep = ("build_info", "total_slots", "model_path", "model_ftype")
    settings = props.get("default_generation_settings") or {}
    return {**{k: props.get(k) for k in keep if k in props}, "n_ctx": settings.get("n_ctx")}
