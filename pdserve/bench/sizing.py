"""How many prefill and decode workers a load needs, from measured profiles.

    pdserve bench sizing --routing bench-results/routing/routing.json \
        --decode-profile docs/cpu-path/decode_profile.json \
        --rate 2 --output-tokens 128 --ttft-ms 2000 --itl-ms 150

Reads one prefill worker's tokens/s, the mean prompt length and the kv-aware prefix hit rate
from a `pdserve.bench.routing` JSON, and the decode step time per batch size from a
`pdserve.bench.decode_profile` JSON, then (docs/deploy.md explains the steps):

- prefill: each request computes u = P (1 - h) tokens, s = u / T_p seconds of one worker. A
  worker busy a fraction r of the time makes a request wait r s / (2 (1 - r)) on average
  (M/D/1: Poisson arrivals, fixed service time), so TTFT ~ s + that <= the target caps r at
  r_max = 2k / (1 + 2k) with k = (TTFT - s) / s; workers N_p = ceil(rate u / (T_p r_max)).
- decode: a step of batch B takes t(B) (linear between profiled sizes) and is the ITL, so one
  worker holds B_max = the largest B with t(B) <= the ITL target; by Little's law
  rate * output_tokens * t(B_max) sequences decode at once; N_d = ceil(that / B_max).

Prints the arithmetic and writes it as JSON with --output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(slots=True, frozen=True)
class PrefillProfile:
    tok_s_per_worker: float
    mean_prompt_tokens: float
    hit_rate: float


@dataclass(slots=True, frozen=True)
class Sizing:
    uncached_tokens: float
    prefill_s: float
    max_utilization: float
    prefill_workers: int
    decode_batch: int
    decode_step_ms: float
    concurrent_sequences: float
    decode_workers: int


def prefill_from_routing(doc: dict, deployment: str = "kv-aware") -> PrefillProfile:
    return PrefillProfile(
        tok_s_per_worker=doc["prefill_profile"]["prefill_tok_s_per_worker"],
        mean_prompt_tokens=doc["workload"]["mean_prompt_tokens"],
        hit_rate=doc["deployments"][deployment]["prefix_hit_rate"],
    )


def step_ms_curve(doc: dict) -> list[tuple[int, float]]:
    points = sorted((r["batch"], r["engine_step_ms"]) for r in doc["results"])
    if not points:
        raise ValueError("the decode profile has no results")
    return points


def step_ms(curve: Sequence[tuple[int, float]], batch: int) -> float:
    """Linear between profiled batch sizes, extended along the last segment beyond them."""
    if batch <= curve[0][0] or len(curve) == 1:
        return curve[0][1] if batch <= curve[0][0] else curve[0][1] * batch / curve[0][0]
    for (b0, t0), (b1, t1) in zip(curve, curve[1:], strict=False):
        if batch <= b1:
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    (b0, t0), (b1, t1) = curve[-2], curve[-1]
    return t1 + (t1 - t0) * (batch - b1) / (b1 - b0)


def max_batch(curve: Sequence[tuple[int, float]], itl_ms: float, limit: int = 4096) -> int:
    if step_ms(curve, 1) > itl_ms:
        raise ValueError(f"one sequence alone steps in {step_ms(curve, 1):.1f} ms > the ITL target")
    batch = 1
    while batch < limit and step_ms(curve, batch + 1) <= itl_ms:
        batch += 1
    return batch


def size(
    prefill: PrefillProfile,
    curve: Sequence[tuple[int, float]],
    rate: float,
    output_tokens: int,
    ttft_ms: float,
    itl_ms: float,
) -> Sizing:
    if rate <= 0 or output_tokens < 1 or ttft_ms <= 0 or itl_ms <= 0:
        raise ValueError("rate, output tokens, TTFT and ITL targets must be positive")
    uncached = prefill.mean_prompt_tokens * (1.0 - prefill.hit_rate)
    service_s = uncached / prefill.tok_s_per_worker
    target_s = ttft_ms / 1e3
    if service_s >= target_s:
        raise ValueError(
            f"one prefill alone takes {service_s * 1e3:.0f} ms >= the TTFT target: no number "
            "of workers meets it (a faster worker or a higher hit rate is needed)"
        )
    k = (target_s - service_s) / service_s
    max_util = 2 * k / (1 + 2 * k)
    prefill_workers = math.ceil(rate * uncached / (prefill.tok_s_per_worker * max_util))
    batch = max_batch(curve, itl_ms)
    step = step_ms(curve, batch)
    concurrent = rate * output_tokens * step / 1e3
    return Sizing(
        uncached_tokens=uncached,
        prefill_s=service_s,
        max_utilization=max_util,
        prefill_workers=max(1, prefill_workers),
        decode_batch=batch,
        decode_step_ms=step,
        concurrent_sequences=concurrent,
        decode_workers=max(1, math.ceil(concurrent / batch)),
    )


def explain(p: PrefillProfile, s: Sizing, args: argparse.Namespace) -> str:
    return "\n".join(
        [
            f"prefill: u = {p.mean_prompt_tokens:.0f} x (1 - {p.hit_rate:.3f}) = "
            f"{s.uncached_tokens:.0f} tokens; s = u / {p.tok_s_per_worker:.0f} tok/s = "
            f"{s.prefill_s * 1e3:.0f} ms",
            f"         TTFT <= {args.ttft_ms:.0f} ms -> utilisation <= {s.max_utilization:.2f}; "
            f"N_p = ceil({args.rate:g} x {s.uncached_tokens:.0f} / ({p.tok_s_per_worker:.0f} x "
            f"{s.max_utilization:.2f})) = {s.prefill_workers}",
            f"decode:  ITL <= {args.itl_ms:.0f} ms -> batch <= {s.decode_batch} "
            f"(step {s.decode_step_ms:.1f} ms); {args.rate:g} x {args.output_tokens} x "
            f"{s.decode_step_ms / 1e3:.3f} s = {s.concurrent_sequences:.1f} sequences -> "
            f"N_d = {s.decode_workers}",
            f"prefill:decode = {s.prefill_workers}:{s.decode_workers}",
        ]
    )


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routing", type=Path, required=True, help="pdserve.bench.routing JSON")
    p.add_argument("--decode-profile", type=Path, required=True, help="decode_profile JSON")
    p.add_argument("--rate", type=float, required=True, help="requests per second to serve")
    p.add_argument("--output-tokens", type=int, default=128, help="mean tokens generated")
    p.add_argument("--ttft-ms", type=float, required=True, help="mean TTFT target")
    p.add_argument("--itl-ms", type=float, required=True, help="ITL target")
    p.add_argument("--router", default="kv-aware", help="whose hit rate to assume")
    p.add_argument("--output", type=Path, default=None, help="also write the result as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        prefill = prefill_from_routing(json.loads(args.routing.read_text()), args.router)
        curve = step_ms_curve(json.loads(args.decode_profile.read_text()))
        result = size(prefill, curve, args.rate, args.output_tokens, args.ttft_ms, args.itl_ms)
    except (OSError, KeyError, ValueError) as exc:
        print(f"sizing: error: {exc}", file=sys.stderr)
        return 1
    print(explain(prefill, result, args))
    if args.output is not None:
        inputs = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        inputs.pop("func", None)
        doc = {"inputs": inputs, "prefill_profile": asdict(prefill), "sizing": asdict(result)}
        args.output.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
