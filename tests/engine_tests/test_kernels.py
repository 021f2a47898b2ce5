"""Paged-attention kernels and backends against the torch references in engine/kernels/reference.py.

Without CUDA the Triton kernels run on the Triton interpreter. Triton picks interpreted or compiled
functions when they are defined, its own standard library included, so TRITON_INTERPRET=1 must be
set before triton is first imported and stay set while kernels run. This module sets it at import
and leaves it set for the rest of the process (it only affects Triton kernels, which cannot run
on CPU otherwise). If an earlier test module already imported triton (transformers model classes
do), the interpreter cannot be switched on any more: the tests here then fail with that reason;
setting TRITON_INTERPRET=1 in the environment (or in conftest.py) avoids it. On a CUDA machine
the variable is left alone and the same tests run compiled, plus the larger `cuda`-marked cases.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import engine.attention.triton_backend as triton_backend  # noqa: E402
from engine.attention.base import AttentionMetadata  # noqa: E402
from engine.kernels import decode_attention, prefill_attention, reference  # noqa: E402
from engine.kernels import write_kv as write_kv_mod  # noqa: E402

INTERPRETER_MISSING = not HAS_CUDA and not isinstance(tl.standard.max, InterpretedFunction)


@pytest.fixture(autouse=True)
def _require_kernel_runtime():
    if INTERPRETER_MISSING:
        pytest.fail(
            "triton was imported before this module set TRITON_INTERPRET=1, so its kernels cannot "
            "run on CPU in this process; run with TRITON_INTERPRET=1 in the environment"
        )


DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU (compiled Triton kernels)"
)


@dataclass(slots=True)
class PagedCase:
    """A random paged KV pool and a flat batch of new tokens over it."""

    q: torch.Tensor  # (T, Hq, D)
    key: torch.Tensor  # (T, Hkv, D): K of the new tokens
    value: torch.Tensor  # (T, Hkv, D)
    k_cache: torch.Tensor  # (N, bs, Hkv, D), holding the prefixes (not yet the new tokens)
    v_cache: torch.Tensor
    meta: AttentionMetadata


def make_case(
    context_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> PagedCase:
    """Sequences get shuffled, non-contiguous blocks; the pool has spare blocks of noise."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for ctx in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    max_blocks = max(blocks_per_seq) + 1  # one padding column of zeros
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor(block_ids[:n], dtype=torch.int32)
        block_ids = block_ids[n:]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    num_tokens = sum(query_lens)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    meta = _metadata(tables, context_lens, query_lens, block_size)
    return PagedCase(
        q=randn(num_tokens, num_heads, head_dim),
        key=randn(num_tokens, num_kv_heads, head_dim),
        value=randn(num_tokens, num_kv_heads, head_dim),
        k_cache=randn(*cache_shape),
        v_cache=randn(*cache_shape),
        meta=meta,
    )


def _metadata(tables, context_lens, query_lens, block_size) -> AttentionMetadata:
    slots = []
    for b, (ctx, qlen) in enumerate(zip(context_lens, query_lens, strict=True)):
        for pos in range(ctx - qlen, ctx):
            slots.append(int(tables[b, pos // block_size]) * block_size + pos % block_size)
    cu = [0, *itertools.accumulate(query_lens)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=tables.to(DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        query_lens=torch.tensor(query_lens, dtype=torch.int32, device=DEVICE),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
    )


def write_new_tokens(case: PagedCase) -> None:
    reference.write_kv_ref(case.key, case.value, case.k_cache, case.v_cache, case.meta.slot_mapping)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# KV write


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size,num_kv_heads", [(8, 1), (16, 3), (32, 8)])
def test_write_kv_matches_reference(dtype, block_size, num_kv_heads):
    case = make_case([5, 37, 16], [5, 4, 1], num_kv_heads, num_kv_heads, 64, block_size, dtype)
    # Strided K/V, as the model produces them by splitting a fused qkv projection.
    fused = torch.cat([case.key, case.value, case.key], dim=1)  # (T, 3 * Hkv, D)
    key, value = fused[:, :num_kv_heads], fused[:, num_kv_heads : 2 * num_kv_heads]
    expected_k, expected_v = case.k_cache.clone(), case.v_cache.clone()
    reference.write_kv_ref(key, value, expected_k, expected_v, case.meta.slot_mapping)

    write_kv_mod.write_kv(key, value, case.k_cache, case.v_cache, case.meta.slot_mapping)

    assert torch.equal(case.k_cache, expected_k)
    assert torch.equal(case.v_cache, expected_v)


# ---------------------------------------------------------------------------------------------
# Decode: (context_lens, Hq, Hkv, D, bs, dtype)

DECODE_CASES = [
    ([1], 4, 4, 64, 16, torch.float32),  # a 1-token context
    ([1, 16, 17, 40], 8, 2, 64, 16, torch.float32),  # GQA 4; block boundaries 16/17
    ([8, 9, 70], 8, 1, 64, 8, torch.float16),  # MQA (GQA 8)
    ([31, 32, 33], 4, 1, 128, 32, torch.bfloat16),  # GQA 4, head_dim 128
    ([3, 100], 2, 2, 128, 16, torch.float16),  # GQA 1, head_dim 128
    ([64, 5, 47], 8, 1, 64, 32, torch.bfloat16),
    ([45, 2], 4, 2, 128, 8, torch.float32),  # 32-key tiles (fp32 rows of 512 bytes)
    ([20, 37], 2, 1, 256, 16, torch.float32),  # 16-key tiles
    ([300, 2], 4, 1, 64, 16, torch.float16),  # 19 partitions of 16: two combine chunks
]


@pytest.mark.parametrize("partition_size", [None, 16, 32])
@pytest.mark.parametrize("ctx,heads,kv_heads,head_dim,block_size,dtype", DECODE_CASES)
def test_decode_matches_reference(
    ctx, heads, kv_heads, head_dim, block_size, dtype, partition_size
):
    case = make_case(ctx, [1] * len(ctx), heads, kv_heads, head_dim, block_size, dtype)
    m = case.meta
    scale = head_dim**-0.5
    expected = reference.paged_decode_attention_ref(
        case.q, case.k_cache, case.v_cache, m.block_tables, m.context_lens, scale
    )
    out = decode_attention.paged_decode_attention(
        case.q, case.k_cache, case.v_cache, m.block_tables, m.context_lens, scale,
        partition_size=partition_size,
    )  # fmt: skip
    assert_close(out, expected)


def test_decode_reads_strided_query():
    """q may be a view with a token stride larger than Hq * D (a slice of fused qkv)."""
    case = make_case([20, 3], [1, 1], 4, 2, 64, 8, torch.float32)
    m = case.meta
    fused = torch.cat([case.q, case.q], dim=1)  # (B, 2 * Hq, D)
    q = fused[:, :4]
    expected = reference.paged_decode_attention_ref(
        case.q, case.k_cache, case.v_cache, m.block_tables, m.context_lens, 0.125
    )
    out = decode_attention.paged_decode_attention(
        q, case.k_cache, case.v_cache, m.block_tables, m.context_lens, 0.125, partition_size=16
    )
    assert_close(out, expected)


def test_decode_reference_agrees_with_prefill_reference():
    """The two references are written separately; a decode batch is a prefill batch of 1-token queries."""
    case = make_case([1, 9, 30], [1, 1, 1], 4, 2, 64, 8, torch.float32)
    m = case.meta
    decode = reference.paged_decode_attention_ref(
        case.q, case.k_cache, case.v_cache, m.block_tables, m.context_lens, 0.3
    )
    prefill = reference.paged_prefill_attention_ref(
        case.q, case.k_cache, case.v_cache, m.block_tables, m.cu_seqlens_q, m.context_lens, 0.3
    )
    torch.testing.assert_close(decode, prefill)


# ---------------------------------------------------------------------------------------------
# Prefill: (context_lens, query_lens, Hq, Hkv, D, bs, dtype)

PREFILL_CASES = [
    ([1], [1], 2, 2, 64, 8, torch.float32),  # a 1-token prompt
    ([16, 17, 5], [16, 17, 5], 8, 2, 64, 16, torch.float32),  # whole prompts, GQA 4
    ([40, 23, 9], [7, 1, 9], 8, 1, 64, 8, torch.float16),  # chunked prefill + a decode row, MQA
    ([70, 33], [66, 2], 4, 1, 128, 32, torch.bfloat16),  # query tiles crossing BLOCK_M
    ([12, 32], [12, 16], 2, 2, 128, 16, torch.float16),  # GQA 1, head_dim 128
    ([50, 7], [40, 7], 4, 2, 128, 16, torch.float32),  # 32-key tiles
]


@pytest.mark.parametrize("ctx,qlens,heads,kv_heads,head_dim,block_size,dtype", PREFILL_CASES)
def test_prefill_matches_reference(ctx, qlens, heads, kv_heads, head_dim, block_size, dtype):
    case = make_case(ctx, qlens, heads, kv_heads, head_dim, block_size, dtype)
    write_new_tokens(case)
    m = case.meta
    scale = head_dim**-0.5
    expected = reference.paged_prefill_attention_ref(
        case.q, case.k_cache, case.v_cache, m.block_tables, m.cu_seqlens_q, m.context_lens, scale
    )
    out = prefill_attention.paged_prefill_attention(
        case.q, case.k_cache, case.v_cache, m.block_tables, m.cu_seqlens_q, m.context_lens, scale
    )
    assert_close(out, expected)


# ---------------------------------------------------------------------------------------------
# Backends through the AttentionBackend protocol: write_kv, then forward


def _backend(name: str):
    if name == "triton":
        return triton_backend.TritonAttentionBackend()
    from engine.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


BACKEND_CASES = [
    # decode-only batches
    ([1, 16, 17, 40], [1, 1, 1, 1], 8, 2, 64, 16, torch.float32),
    ([8, 9, 70], [1, 1, 1], 8, 1, 128, 8, torch.float16),
    ([33, 2], [1, 1], 4, 4, 64, 32, torch.bfloat16),
    # prefill and mixed batches
    ([1], [1], 4, 1, 64, 8, torch.float32),
    ([40, 23, 9, 16], [7, 1, 9, 16], 8, 2, 64, 8, torch.float32),
    ([20, 33], [20, 2], 8, 1, 128, 16, torch.bfloat16),
    ([17, 5, 64], [3, 5, 1], 4, 4, 64, 32, torch.float16),
]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("ctx,qlens,heads,kv_heads,head_dim,block_size,dtype", BACKEND_CASES)
def test_backend_matches_reference(
    backend_name, ctx, qlens, heads, kv_heads, head_dim, block_size, dtype
):
    case = make_case(ctx, qlens, heads, kv_heads, head_dim, block_size, dtype)
    m = case.meta
    expected_k, expected_v = case.k_cache.clone(), case.v_cache.clone()
    reference.write_kv_ref(case.key, case.value, expected_k, expected_v, m.slot_mapping)
    expected = reference.paged_prefill_attention_ref(
        case.q, expected_k, expected_v, m.block_tables, m.cu_seqlens_q, m.context_lens, 0.2
    )
    backend = _backend(backend_name)

    backend.write_kv(case.key, case.value, case.k_cache, case.v_cache, m)
    out = backend.forward(case.q, case.k_cache, case.v_cache, m, 0.2)

    assert backend.name == backend_name
    assert torch.equal(case.k_cache, expected_k) and torch.equal(case.v_cache, expected_v)
    assert_close(out, expected)


def test_triton_backend_rejects_out_of_range_block_tables():
    """Value checks run on the first use of each metadata object."""
    case = make_case([20, 3], [1, 1], 4, 2, 64, 8, torch.float32)
    backend = triton_backend.TritonAttentionBackend()
    bad = case.meta
    bad.block_tables[0, 0] = case.k_cache.shape[0]
    with pytest.raises(ValueError, match="block_tables values"):
        backend.forward(case.q, case.k_cache, case.v_cache, bad, 0.1)
    fresh = _metadata(bad.block_tables.cpu(), [20, 3], [1, 1], 8)
    with pytest.raises(ValueError, match="block_tables values"):
        backend.forward(case.q, case.k_cache, case.v_cache, fresh, 0.1)


# ---------------------------------------------------------------------------------------------
# Launcher argument checks


@pytest.fixture
def decode_case() -> PagedCase:
    return make_case([20, 3], [1, 1], 4, 2, 64, 8, torch.float32)


def _decode(case: PagedCase, **overrides):
    m = case.meta
    args = dict(
        q=case.q, k_cache=case.k_cache, v_cache=case.v_cache,
        block_tables=m.block_tables, context_lens=m.context_lens, scale=0.1,
    )  # fmt: skip
    args.update(overrides)
    return decode_attention.paged_decode_attention(**args)


def _prefill(case: PagedCase, **overrides):
    m = case.meta
    args = dict(
        q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, block_tables=m.block_tables,
        cu_seqlens_q=m.cu_seqlens_q, context_lens=m.context_lens, scale=0.1,
    )  # fmt: skip
    args.update(overrides)
    return prefill_attention.paged_prefill_attention(**args)


def test_decode_rejects_bad_arguments(decode_case):
    c, m = decode_case, decode_case.meta
    bad = {
        "head_dim must be a power of two": dict(
            q=c.q[..., :48], k_cache=c.k_cache[..., :48], v_cache=c.v_cache[..., :48]
        ),
        "v_cache dtype": dict(v_cache=c.v_cache.half()),
        "q dtype": dict(q=c.q.half()),
        "block_tables must be torch.int32": dict(block_tables=m.block_tables.long()),
        "block_tables must be \\(2, max_blocks\\)": dict(block_tables=m.block_tables[:1]),
        "context_lens must be torch.int32": dict(context_lens=m.context_lens.long()),
        "block_tables values must be in": dict(block_tables=m.block_tables + c.k_cache.shape[0]),
        "context_lens must be in \\[1, 32\\]": dict(context_lens=m.context_lens * 2),
        "context_lens must be in": dict(context_lens=m.context_lens * 0),
        "contiguous last dimension": dict(q=c.q.transpose(1, 2).contiguous().transpose(1, 2)),
        "multiple of num_kv_heads": dict(q=c.q[:, :3]),
        "partition_size must be a power of two": dict(partition_size=24),
        "max_context_len is 19 but the batch needs 20": dict(max_context_len=19),
        "k_cache must be": dict(k_cache=c.k_cache[0], v_cache=c.v_cache[0]),
        "float32, float16 or bfloat16": dict(
            q=c.q.double(), k_cache=c.k_cache.double(), v_cache=c.v_cache.double()
        ),
    }
    for message, overrides in bad.items():
        with pytest.raises(ValueError, match=message):
            _decode(c, **overrides)


def test_prefill_rejects_bad_arguments():
    c = make_case([20, 9], [4, 9], 4, 2, 64, 8, torch.float32)
    m = c.meta
    bad = {
        "cu_seqlens_q must run from 0 to 13": dict(cu_seqlens_q=m.cu_seqlens_q - 1),
        "query_len 9 must be in \\[1, context_len=5\\]": dict(context_lens=m.context_lens - 4),
        "cu_seqlens_q must have shape \\(3,\\)": dict(cu_seqlens_q=m.cu_seqlens_q[:2]),
        "block_tables values": dict(block_tables=m.block_tables - 1),
        "max_query_len is 8 but the batch needs 9": dict(max_query_len=8),
        "head_dim must be a power of two": dict(
            q=c.q[..., :8], k_cache=c.k_cache[..., :8], v_cache=c.v_cache[..., :8]
        ),
    }
    for message, overrides in bad.items():
        with pytest.raises(ValueError, match=message):
            _prefill(c, **overrides)


def test_write_kv_rejects_bad_arguments(decode_case):
    c, m = decode_case, decode_case.meta
    num_slots = c.k_cache.shape[0] * c.k_cache.shape[1]
    bad = {
        "slot_mapping values must be in": dict(slot_mapping=m.slot_mapping + num_slots),
        "slot_mapping must be torch.int64": dict(slot_mapping=m.slot_mapping.int()),
        "key must be \\(2, 2, 64\\)": dict(key=c.key[:, :1]),
        "value dtype": dict(value=c.value.half()),
        "v_cache shape": dict(v_cache=c.v_cache[:-1]),
    }
    for message, overrides in bad.items():
        args = dict(key=c.key, value=c.value, k_cache=c.k_cache, v_cache=c.v_cache,
                    slot_mapping=m.slot_mapping)  # fmt: skip
        args.update(overrides)
        with pytest.raises(ValueError, match=message):
            write_kv_mod.write_kv(**args)


def test_empty_batches_return_empty_outputs():
    case = make_case([4], [1], 4, 2, 64, 8, torch.float32)
    empty_q = case.q[:0]
    none = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    no_tables = torch.zeros(0, 1, dtype=torch.int32, device=DEVICE)
    args = (case.k_cache, case.v_cache, no_tables)
    assert _decode(case, q=empty_q, block_tables=no_tables, context_lens=none).shape == (0, 4, 64)
    cu_seqlens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = prefill_attention.paged_prefill_attention(empty_q, *args, cu_seqlens, none, 0.1)
    assert out.shape == (0, 4, 64)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal; CUDA tensors are valid inputs here")
def test_cpu_tensors_without_interpreter_are_refused():
    """Outside the interpreter, CPU tensors get a clear error instead of a crash in Triton."""
    code = (
        "import torch\n"
        "from engine.kernels.write_kv import write_kv\n"
        "c = torch.zeros(2, 8, 1, 64)\n"
        "k = torch.zeros(1, 1, 64)\n"
        "try:\n"
        "    write_kv(k, k, c, c.clone(), torch.zeros(1, dtype=torch.int64))\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "need the Triton interpreter" in result.stdout, result.stderr


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal; on CUDA the benchmark would run")
def test_decode_benchmark_refuses_without_cuda(capsys):
    from pdserve.bench import triton_decode as bench_decode

    assert bench_decode.main(["--peak-gbps", "1000"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Larger shapes, compiled, on a GPU


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (16, 16, 64), (32, 1, 128)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_cuda_decode_large(dtype, heads, kv_heads, head_dim, block_size):
    ctx = [1, 15, 16, 17, 255, 256, 1000, 4097, 2048, 513]
    case = make_case(ctx, [1] * len(ctx), heads, kv_heads, head_dim, block_size, dtype, seed=1)
    m = case.meta
    expected = reference.paged_decode_attention_ref(
        case.q, case.k_cache, case.v_cache, m.block_tables, m.context_lens, 0.09
    )
    for partition_size in (None, 256, 512):
        out = decode_attention.paged_decode_attention(
            case.q, case.k_cache, case.v_cache, m.block_tables, m.context_lens, 0.09,
            partition_size=partition_size,
        )  # fmt: skip
        assert_close(out, expected)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (8, 1, 64)])
def test_cuda_prefill_and_backend_large(dtype, heads, kv_heads, head_dim):
    ctx, qlens = [1000, 300, 77, 2049, 64], [1000, 129, 1, 512, 64]
    case = make_case(ctx, qlens, heads, kv_heads, head_dim, 16, dtype, seed=2)
    m = case.meta
    expected_k, expected_v = case.k_cache.clone(), case.v_cache.clone()
    reference.write_kv_ref(case.key, case.value, expected_k, expected_v, m.slot_mapping)
    expected = reference.paged_prefill_attention_ref(
        case.q, expected_k, expected_v, m.block_tables, m.cu_seqlens_q, m.context_lens, 0.09
    )
    for name in ("triton", "torch"):
        k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
        backend = _backend(name)
        backend.write_kv(case.key, case.value, k_cache, v_cache, m)
        assert_close(backend.forward(case.q, k_cache, v_cache, m, 0.09), expected)
