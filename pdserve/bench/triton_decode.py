"""Decode-attention microbenchmark (CUDA only).

Decode attention is memory bound: each step reads every cached K and V byte of the batch once.
This measures the paged Triton kernel's achieved bandwidth (K/V bytes read / kernel time) against
a given peak, next to torch's scaled_dot_product_attention on K/V already gathered into contiguous
tensors (the gather itself is not timed, which flatters SDPA).

    python -m pdserve.bench.triton_decode --peak-gbps 3350 --out decode_bench.json

Times are medians from triton.testing.do_bench, which clears the L2 cache between runs. The
launcher runs with validate=False so the value checks' host sync is not part of the timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(slots=True)
class Shape:
    batch: int
    context_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def kv_bytes(self) -> int:
        """K and V bytes one decode step reads."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.batch * self.context_len * self.num_kv_heads * self.head_dim * itemsize


@dataclass(slots=True)
class Result:
    batch: int
    context_len: int
    kv_bytes: int
    partition_size: int
    triton_us: float
    triton_gbps: float
    triton_frac_of_peak: float
    sdpa_us: float
    sdpa_gbps: float
    max_abs_diff: float  # Triton vs SDPA outputs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.triton_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--peak-gbps", type=float, required=True,
                   help="peak memory bandwidth of the GPU in GB/s (e.g. 3350 for H100 SXM)")  # fmt: skip
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--ctx", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--max-gib", type=float, default=None,
                   help="skip shapes whose paged + gathered K/V exceed this (default: 80%% of free memory)")  # fmt: skip
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_decode measures GPU kernels and needs a CUDA device; none is available.",
              file=sys.stderr)  # fmt: skip
        return 2
    budget = args.max_gib * 2**30 if args.max_gib else 0.8 * torch.cuda.mem_get_info()[0]
    results = []
    for batch in args.batch:
        for ctx in args.ctx:
            shape = Shape(batch, ctx, args.num_heads, args.num_kv_heads, args.head_dim,
                          args.block_size, DTYPES[args.dtype])  # fmt: skip
            if 2 * shape.kv_bytes > budget:
                print(
                    f"skip batch={batch} ctx={ctx}: {2 * shape.kv_bytes / 2**30:.1f} GiB > budget"
                )
                continue
            results.append(bench_shape(shape, args.peak_gbps))
            print(format_row(results[-1]))
            torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, args, results)
    return 0


def bench_shape(shape: Shape, peak_gbps: float) -> Result:
    """Time both paths on one random batch where every sequence has context_len tokens."""
    import triton.testing

    from engine.kernels.decode_attention import choose_partition_size, paged_decode_attention

    q, k_cache, v_cache, tables, lens = random_batch(shape)
    scale = shape.head_dim**-0.5
    device = q.device
    part = choose_partition_size(shape.batch, shape.num_kv_heads, shape.context_len, device)

    def run_triton() -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                      max_context_len=shape.context_len, validate=False)  # fmt: skip

    k, v = gather(k_cache, tables, shape), gather(v_cache, tables, shape)  # (B, Hkv, ctx, D)
    q4 = q.unsqueeze(2)  # (B, Hq, 1, D)

    def run_sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    diff = (run_triton().float() - run_sdpa().squeeze(2).float()).abs().max().item()
    t_triton = triton.testing.do_bench(run_triton, return_mode="median") * 1e-3  # seconds
    t_sdpa = triton.testing.do_bench(run_sdpa, return_mode="median") * 1e-3
    gbps = shape.kv_bytes / t_triton / 1e9
    return Result(
        shape.batch, shape.context_len, shape.kv_bytes, part, t_triton * 1e6, gbps,
        gbps / peak_gbps, t_sdpa * 1e6, shape.kv_bytes / t_sdpa / 1e9, diff,
    )  # fmt: skip


def random_batch(shape: Shape):
    """q (B, Hq, D); caches (N, bs, Hkv, D) with each sequence's blocks scattered at random."""
    device = torch.device("cuda")
    blocks_per_seq = -(-shape.context_len // shape.block_size)
    num_blocks = shape.batch * blocks_per_seq
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = perm.view(shape.batch, blocks_per_seq)  # (B, blocks_per_seq)
    lens = torch.full((shape.batch,), shape.context_len, dtype=torch.int32, device=device)
    q = torch.randn(shape.batch, shape.num_heads, shape.head_dim, dtype=shape.dtype, device=device)
    return q, k_cache, v_cache, tables, lens


def gather(cache: torch.Tensor, tables: torch.Tensor, shape: Shape) -> torch.Tensor:
    """(N, bs, Hkv, D) paged cache -> contiguous (B, Hkv, ctx, D)."""
    x = cache[tables.long()].flatten(1, 2)[:, : shape.context_len]  # (B, ctx, Hkv, D)
    return x.transpose(1, 2).contiguous()


def format_row(r: Result) -> str:
    return (
        f"batch={r.batch:4d} ctx={r.context_len:5d} kv={r.kv_bytes / 2**20:9.1f} MiB "
        f"partition={r.partition_size:5d} | triton {r.triton_us:9.1f} us {r.triton_gbps:7.1f} GB/s "
        f"({100 * r.triton_frac_of_peak:5.1f}% of peak) | sdpa(gathered) {r.sdpa_us:9.1f} us "
        f"{r.sdpa_gbps:7.1f} GB/s | max|diff| {r.max_abs_diff:.2e}"
    )


def write_json(path: str, args: argparse.Namespace, results: list[Result]) -> None:
    report = {
        "device": torch.cuda.get_device_name(),
        "peak_gbps": args.peak_gbps,
        "num_heads": args.num_heads,
        "num_kv_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "block_size": args.block_size,
        "dtype": args.dtype,
        "results": [asdict(r) for r in results],
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
