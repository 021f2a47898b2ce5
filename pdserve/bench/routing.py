"""Shared-prefix routing benchmark: kv-aware vs round-robin over 2 prefill workers, against one
prefill worker that gets all the traffic, measured in one run.

    python -m pdserve.bench.routing --out-dir bench-results/routing [--model M]
        [--num-requests 96] [--max-concurrency 4]

Workload: `--num-system-prompts` system prompts of about `--system-tokens` tokens, each
followed by a short question (a few tokens, all different), in one seeded order that every
deployment gets. Three `pdserve serve` clusters (1 decode worker each) are started side by side
on free 127.0.0.1 ports one after the other (one at a time: a shared machine's memory and
cores go to the one being measured), each measured on the same prompts:

- `one-worker`: 1 prefill worker (the hit rate a single cache with all the traffic reaches);
- `round-robin`: 2 prefill workers, `--router round-robin`;
- `kv-aware`: 2 prefill workers, `--router kv-aware`.

The prefix hit rate is the prefill workers' own prefix-cache counters (prompt tokens served from
the cache / prompt tokens looked up, `pdserve:prefix_cache_*` on the gateway's /metrics) over
the run; TTFT is measured by the client. Before the routed runs, `--profile-prompts` cold
prompts of `--system-tokens` tokens are sent one at a time to the one-worker cluster: their
TTFT gives one prefill worker's tokens/s, which `python -m pdserve.bench.sizing` reads.
Writes routing.json and routing.png.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdserve.bench.client import COMPLETIONS_ENDPOINT, RequestInput, RequestOutput
from pdserve.bench.runner import LoadConfig, run_load
from pdserve.bench.sweep import free_ports
from pdserve.launcher import probe_http

DEPLOYMENTS: dict[str, tuple[str, ...]] = {
    "one-worker": ("--num-prefill", "1"),
    "round-robin": ("--num-prefill", "2", "--router", "round-robin"),
    "kv-aware": ("--num-prefill", "2", "--router", "kv-aware"),
}
_WORDS = (
    "system assistant answer policy careful helpful data model token cache block prefix route "
    "worker decode prefill gateway latency memory page lease transfer schedule batch request "
    "question context reply style brief polite expert domain rule format list table summary"
).split()


# -- the workload ------------------------------------------------------------------------------


def system_prompt(rng: random.Random, tokenizer: Any, target_tokens: int) -> str:
    words: list[str] = [f"You are assistant number {rng.randrange(10**6)}."]
    while len(tokenizer.encode(" ".join(words))) < target_tokens:
        words += rng.choices(_WORDS, k=16)
    return " ".join(words)


def build_workload(
    tokenizer: Any, num_system: int, system_tokens: int, num_requests: int, seed: int
) -> list[tuple[int, str]]:
    """(system prompt index, full prompt) in the order sent; every prompt index equally often."""
    rng = random.Random(seed)
    systems = [system_prompt(rng, tokenizer, system_tokens) for _ in range(num_system)]
    order = [i % num_system for i in range(num_requests)]
    rng.shuffle(order)
    return [(s, f"{systems[s]}\nQuestion {k}: what is {rng.choice(_WORDS)}?") for k, s in enumerate(order)]  # fmt: skip


# -- clusters ----------------------------------------------------------------------------------


class Cluster:
    def __init__(self, name: str, serve_args: Sequence[str], out_dir: Path) -> None:
        http, grpc_port, prefill, decode = free_ports(4)
        argv = [sys.executable, "-m", "pdserve.cli", "serve", *serve_args, *DEPLOYMENTS[name],
                "--port", str(http), "--grpc-port", str(grpc_port), "--prefill-port",
                str(prefill), "--decode-port", str(decode)]  # fmt: skip
        self.name = name
        self.base_url = f"http://127.0.0.1:{http}"
        self.log = out_dir / f"serve-{name}.log"
        self.proc = subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not probe_http(f"{self.base_url}/health"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not get healthy; see {self.log}")
            time.sleep(1.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def prefix_counters(self) -> dict[str, tuple[float, float]]:
        """Per prefill worker: (prompt tokens looked up, of which served by the cache)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        out: dict[str, list[float]] = {}
        for family in text_string_to_metric_families(text):
            column = {"pdserve:prefix_cache_queries": 0, "pdserve:prefix_cache_hits": 1}
            if family.name not in column:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("role") == "prefill":
                    out.setdefault(sample.labels["worker"], [0.0, 0.0])[column[family.name]] = (
                        sample.value
                    )
        return {k: (v[0], v[1]) for k, v in out.items()}

    def model(self) -> str:
        return httpx.get(f"{self.base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def _inputs(cluster: Cluster, prompts: Sequence[str], max_tokens: int) -> list[RequestInput]:
    url, model = cluster.base_url + COMPLETIONS_ENDPOINT, cluster.model()
    return [RequestInput(url, model, p, 0, max_tokens, chat=False, ignore_eos=True) for p in prompts]  # fmt: skip


# -- measuring ---------------------------------------------------------------------------------


def _ms_summary(seconds: Sequence[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p90": pick(0.9), "p99": pick(0.99)}  # fmt: skip


_REPORT_WAIT_S = 2.5  # the gateway polls workers' load every second: counters lag by that much


def measure(cluster: Cluster, prompts: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    time.sleep(_REPORT_WAIT_S)  # what came before (the profile) is in the counters
    before = cluster.prefix_counters()
    load = LoadConfig(max_concurrency=args.max_concurrency, disable_tqdm=True, seed=args.seed)
    run = run_load(_inputs(cluster, prompts, args.max_tokens), load)
    time.sleep(_REPORT_WAIT_S)
    after = cluster.prefix_counters()
    ok: list[RequestOutput] = [o for o in run.outputs if o.success]
    per_worker = {
        w: {
            "queries": after[w][0] - before.get(w, (0, 0))[0],
            "hits": after[w][1] - before.get(w, (0, 0))[1],
        }  # fmt: skip
        for w in after
    }
    queries = sum(v["queries"] for v in per_worker.values())
    hits = sum(v["hits"] for v in per_worker.values())
    return {
        "completed": len(ok),
        "failed": len(run.outputs) - len(ok),
        "duration_s": run.duration,
        "prefix_hit_rate": hits / queries if queries else 0.0,
        "prompt_tokens_looked_up": queries,
        "prompt_tokens_from_cache": hits,
        "per_worker": per_worker,
        "ttft_ms": _ms_summary([o.ttft for o in ok]),
        "e2e_ms": _ms_summary([o.latency for o in ok]),
    }


def prefill_profile(cluster: Cluster, tokenizer: Any, args: argparse.Namespace) -> dict:
    """One cold prompt at a time: TTFT ~ one prefill worker computing the whole prompt."""
    rng = random.Random(args.seed + 1)
    prompts = [system_prompt(rng, tokenizer, args.system_tokens) for _ in range(args.profile_prompts)]  # fmt: skip
    load = LoadConfig(max_concurrency=1, disable_tqdm=True)
    run = run_load(_inputs(cluster, prompts, 1), load)
    ttfts = [o.ttft for o in run.outputs if o.success]
    tokens = statistics.fmean(len(tokenizer.encode(p)) for p in prompts)
    return {
        "prompt_tokens": tokens,
        "ttft_ms_median": statistics.median(ttfts) * 1e3,
        "prefill_tok_s_per_worker": tokens / statistics.median(ttfts),
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    workload = build_workload(
        tokenizer, args.num_system_prompts, args.system_tokens, args.num_requests, args.seed
    )
    prompts = [p for _, p in workload]
    result: dict[str, Any] = {
        "command": " ".join(["python -m pdserve.bench.routing", *args.argv]),
        "workload": {
            "num_system_prompts": args.num_system_prompts,
            "system_prompt_tokens": args.system_tokens,
            "num_requests": len(prompts),
            "mean_prompt_tokens": statistics.fmean(len(tokenizer.encode(p)) for p in prompts),
            "max_tokens": args.max_tokens,
            "max_concurrency": args.max_concurrency,
        },
        "deployments": {},
    }
    serve_args = ["--model", args.model, *args.serve_args]
    for name in DEPLOYMENTS:
        cluster = Cluster(name, serve_args, out_dir)
        try:
            cluster.wait_ready(args.ready_timeout)
            if name == "one-worker":
                result["prefill_profile"] = prefill_profile(cluster, tokenizer, args)
            print(f"{name} ...", flush=True)
            result["deployments"][name] = measure(cluster, prompts, args)
        finally:
            cluster.stop()
    result["ratios"] = ratios(result["deployments"])
    return result


def ratios(d: dict[str, dict]) -> dict[str, float]:
    kv, rr, one = d["kv-aware"], d["round-robin"], d["one-worker"]
    return {
        "kv_aware_hit_rate_vs_one_worker": kv["prefix_hit_rate"] / one["prefix_hit_rate"],
        "round_robin_hit_rate_vs_one_worker": rr["prefix_hit_rate"] / one["prefix_hit_rate"],
        "kv_aware_ttft_median_vs_round_robin": kv["ttft_ms"]["median"] / rr["ttft_ms"]["median"],
        "kv_aware_ttft_p90_vs_round_robin": kv["ttft_ms"]["p90"] / rr["ttft_ms"]["p90"],
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["deployments"])
    d = result["deployments"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [d[n]["prefix_hit_rate"] * 100 for n in names], color="tab:blue")
    axes[0].set_ylabel("prefix-cache hit rate (% of prompt tokens)")
    axes[0].set_ylim(0, 100)
    for i, key in enumerate(("median", "p90")):
        axes[1].bar([x + 0.4 * i for x in range(len(names))], [d[n]["ttft_ms"][key] for n in names], 0.4, label=key)  # fmt: skip
    axes[1].set_xticks([x + 0.2 for x in range(len(names))], names)
    axes[1].set_ylabel("TTFT (ms)")
    axes[1].legend()
    w = result["workload"]
    fig.suptitle(
        f"{w['num_system_prompts']} system prompts x ~{w['system_prompt_tokens']} tokens, "
        f"{w['num_requests']} requests, concurrency {w['max_concurrency']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="bench-results/routing")
    p.add_argument("--model", default=None, help="HF folder (default: the default model)")
    p.add_argument("--num-system-prompts", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=450)
    p.add_argument("--num-requests", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--profile-prompts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--serve-args", default="", help="extra `pdserve serve` flags, one string")


def run(args: argparse.Namespace) -> int:
    if args.num_requests < args.num_system_prompts or args.num_system_prompts < 1:
        print("routing: --num-requests must be >= --num-system-prompts >= 1", file=sys.stderr)
        return 2
    args.argv = getattr(args, "argv", sys.argv[1:])
    if isinstance(args.serve_args, str):
        args.serve_args = args.serve_args.split()
    if args.model is None:
        from pdserve.default_model import resolve_model

        args.model = str(resolve_model(None))
    result = run_all(args)
    out_dir = Path(args.out_dir)
    (out_dir / "routing.json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, out_dir / "routing.png")
    print(json.dumps({k: result[k] for k in ("ratios", "prefill_profile")}, indent=2))
    for name, d in result["deployments"].items():
        print(f"{name:12s} hit rate {d['prefix_hit_rate']:.3f}  TTFT median {d['ttft_ms']['median']:.0f} ms  p90 {d['ttft_ms']['p90']:.0f} ms  failed {d['failed']}")  # fmt: skip
    print(f"wrote {out_dir / 'routing.json'} and {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_parser(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
