"""Where a decode step's time goes, on the compiled CPU path and the eager one.

    python -m pdserve.bench.decode_profile [--model DIR] [--batch 1 32] [--context 512]
        [--num-threads 2] [--output decode_profile.json]

For each batch size: B requests that each hold `context` cached tokens decode one token per
step. It times the engine's whole step (schedule, prepare, forward, sample, postprocess), the
forward alone (fused and eager), and inside the fused forward the matmuls (the model's packed
weights, same shapes) and the paged attention (same block tables, all layers); the rest of the
forward (norms, RoPE, SiLU, KV writes, embedding) is the difference. It also times torch's
matmul on the same weights, the baseline the packed kernel replaced. Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, SchedulerOutput


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after two warm-ups."""
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def _decode_batch(engine: LLMEngine, batch: int, context: int) -> SchedulerOutput:
    requests = []
    for i in range(batch):
        r = Request(f"p{i}", [(7 * i + j) % 1000 + 10 for j in range(context)], SamplingParams())
        if not engine.kv.allocate(r, context):
            raise ValueError(f"the KV pool cannot hold {batch} x {context} tokens")
        r.num_computed_tokens = context - 1
        requests.append(r)
    return SchedulerOutput(scheduled=[ScheduledRequest(r, 1) for r in requests])


def profile_batch(engine: LLMEngine, batch: int, context: int, repeats: int) -> dict:
    runner = engine.runner
    fused = runner.fused
    if fused is None:
        raise ValueError("the fused CPU forward is not active on this machine")
    sched = _decode_batch(engine, batch, context)
    requests = [s.request for s in sched.scheduled]
    ext = fused._ext
    args = engine.runner.model.args
    input_ids, positions, meta, logits_idx = runner._prepare(sched)

    def step() -> None:  # prepare + forward + sample, as the engine step does
        logits = runner.execute(sched)
        engine.sampler(logits, requests)

    out: dict = {"batch": batch, "context": context}
    out["engine_step_ms"] = _time(step, repeats) * 1e3
    out["prepare_ms"] = _time(lambda: runner._prepare(sched), repeats) * 1e3
    out["fused_forward_ms"] = (
        _time(lambda: fused(input_ids, positions, runner.kv_cache, meta, logits_idx), repeats) * 1e3
    )
    x_h = torch.randn(batch, args.hidden_size)
    x_i = torch.randn(batch, args.intermediate_size)
    x_q = torch.randn(batch, args.num_heads * args.head_dim)
    empty = torch.empty(0)
    per_layer = 9
    L = args.num_layers
    w = fused.weights
    sizes = [
        (1, x_h, (args.num_heads + 2 * args.num_kv_heads) * args.head_dim),
        (5, x_q, args.hidden_size),
        (7, x_h, 2 * args.intermediate_size),
        (8, x_i, args.hidden_size),
    ]

    def packed() -> None:
        for layer in range(L):
            for idx, x, n in sizes:
                ext.packed_linear(x, w[layer * per_layer + idx], n, empty)
        ext.packed_linear(x_h, w[L * per_layer + 2], args.vocab_size, empty)

    model = runner.model
    torch_weights = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        torch_weights += [
            (x_h, a.qkv_proj.weight),
            (x_q, a.o_proj.weight),
            (x_h, m.gate_up_proj.weight),
            (x_i, m.down_proj.weight),
        ]
    torch_weights.append((x_h, model.lm_head.weight))

    def torch_mm() -> None:
        for x, weight in torch_weights:
            torch.nn.functional.linear(x, weight)

    q = torch.randn(batch, args.num_heads, args.head_dim)

    def attention() -> None:
        for layer in range(L):
            kv = runner.kv_cache[layer]
            ext.paged_attention(
                q, kv[0], kv[1], meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 0.125
            )

    logits = runner.execute(sched)
    out["sampler_ms"] = _time(lambda: engine.sampler(logits, requests), repeats) * 1e3
    out["matmul_packed_ms"] = _time(packed, repeats) * 1e3
    out["matmul_torch_ms"] = _time(torch_mm, repeats) * 1e3
    out["attention_ms"] = _time(attention, repeats) * 1e3
    out["other_forward_ms"] = max(
        0.0, out["fused_forward_ms"] - out["matmul_packed_ms"] - out["attention_ms"]
    )
    out["sampler_and_python_ms"] = max(0.0, out["engine_step_ms"] - out["fused_forward_ms"])
    runner.fused = None
    try:
        out["eager_forward_ms"] = (
            _time(
                lambda: model(
                    input_ids, positions, runner.kv_cache, meta, runner.backend, logits_idx
                ),
                repeats,
            )
            * 1e3
        )
    finally:
        runner.fused = fused
    weight_bytes = sum(wt.numel() * 4 for _, wt in torch_weights)
    out["weight_bytes"] = weight_bytes
    out["packed_matmul_gb_s"] = weight_bytes / out["matmul_packed_ms"] / 1e6
    out["torch_matmul_gb_s"] = weight_bytes / out["matmul_torch_ms"] / 1e6
    out["decode_tok_s"] = batch / out["engine_step_ms"] * 1e3
    for r in requests:
        engine.kv.free(r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--output", type=Path, default=Path("decode_profile.json"))
    args = p.parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    from pdserve.default_model import resolve_model

    model = str(resolve_model(args.model))
    engine = LLMEngine(EngineConfig(model=model, num_threads=args.num_threads))
    with torch.inference_mode():
        results = [profile_batch(engine, b, args.context, args.repeats) for b in args.batch]
    report = {"threads": torch.get_num_threads(), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
