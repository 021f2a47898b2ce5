"""The compiled CPU kernels (engine/cpu) against the plain torch references.

Random paged pools with shuffled block tables, ragged contexts, GQA ratios, block sizes, decode
rows, chunked prefill over a cached prefix and prefix hits, all in one flat batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import cpu
from engine.kernels import reference

ext = cpu.load()
needs_packed = pytest.mark.skipif(
    not ext.has_packed_matmul(),
    reason="the packed matmul and the fused forward need AVX-512 or AVX2 with FMA"
)


def _case(ctx_lens, query_lens, heads, kv_heads, head_dim, block_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(ctx_lens), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
        used += n
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    T = sum(query_lens)
    q = torch.randn(T, heads, head_dim, generator=g)
    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(query_lens).cumsum(0)
    return q, k_cache, v_cache, tables, torch.tensor(ctx_lens, dtype=torch.int32), cu


CASES = [
    # (context lens, query lens): decode only, prefill only, chunked prefill, mixed
    ([1], [1]),
    ([37, 5, 300], [1, 1, 1]),
    ([64], [64]),
    ([100], [30]),  # a chunk over a 70-token cached prefix (or a prefix hit)
    ([17, 200, 3, 48], [1, 50, 3, 1]),
    # few (sequence, kv head) items and long contexts: the keys split across threads
    ([1000], [1]),
    ([130, 700], [1, 1]),
]


@pytest.mark.parametrize("ctx_lens,query_lens", CASES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_paged_attention_matches_reference(ctx_lens, query_lens, heads, kv_heads, block_size):
    head_dim = 64 if heads != 8 else 32
    q, kc, vc, tables, ctx, cu = _case(ctx_lens, query_lens, heads, kv_heads, head_dim, block_size)
    scale = head_dim**-0.5
    out = ext.paged_attention(q, kc, vc, tables, ctx, cu, scale)
    ref = reference.paged_prefill_attention_ref(q, kc, vc, tables, cu, ctx, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("head_dim", [16, 48, 128])  # 48: no vector tile, the portable loop
@pytest.mark.parametrize("block_size", [8, 16])
def test_paged_attention_other_head_dims(head_dim, block_size):
    ctx_lens, query_lens = [17, 200, 3, 48], [1, 50, 3, 1]
    q, kc, vc, tables, ctx, cu = _case(ctx_lens, query_lens, 9, 3, head_dim, block_size, seed=1)
    scale = head_dim**-0.5
    out = ext.paged_attention(q, kc, vc, tables, ctx, cu, scale)
    ref = reference.paged_prefill_attention_ref(q, kc, vc, tables, cu, ctx, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_paged_attention_rejects_bad_block_ids():
    q, kc, vc, tables, ctx, cu = _case([40], [1], 4, 2, 16, 16)
    tables[0, 1] = kc.shape[0]
    with pytest.raises(RuntimeError, match="out of range"):
        ext.paged_attention(q, kc, vc, tables, ctx, cu, 0.25)


def test_paged_attention_rejects_short_table():
    q, kc, vc, tables, ctx, cu = _case([40], [1], 4, 2, 16, 16)
    ctx[0] = 100
    with pytest.raises(RuntimeError, match="too short"):
        ext.paged_attention(q, kc, vc, tables, ctx, cu, 0.25)


def test_fused_small_ops_match_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 96, generator=g)
    r = torch.randn(7, 96, generator=g)
    w = torch.randn(96, generator=g)
    torch.testing.assert_close(ext.rms_norm(x, w, 1e-5), F.rms_norm(x, (96,), w, 1e-5))
    x2, r2 = x.clone(), r.clone()
    ext.fused_add_rms_norm(x2, r2, w, 1e-5)
    torch.testing.assert_close(r2, x + r)
    torch.testing.assert_close(x2, F.rms_norm(x + r, (96,), w, 1e-5))
    gu = torch.randn(5, 2 * 40, generator=g)
    torch.testing.assert_close(ext.silu_and_mul(gu), F.silu(gu[:, :40]) * gu[:, 40:])


def test_rotary_matches_the_model_module():
    from engine.models.llama import RotaryEmbedding

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    rot = RotaryEmbedding(inv_freq, 1.0, 64)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(6, 4, 32, generator=g)
    k = torch.randn(6, 2, 32, generator=g)
    positions = torch.tensor([0, 1, 5, 17, 40, 63])
    q_ref, k_ref = rot(positions, q, k)
    ext.rotary_embedding(positions, q, k, rot.cos, rot.sin)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)


def test_rotary_rejects_positions_past_the_table():
    from engine.models.llama import RotaryEmbedding

    rot = RotaryEmbedding(torch.ones(8), 1.0, 16)
    q, k = torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)
    with pytest.raises(RuntimeError, match="rotary table"):
        ext.rotary_embedding(torch.tensor([16]), q, k, rot.cos, rot.sin)


@needs_packed
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 17, 64, 70, 130])
@pytest.mark.parametrize("N,K", [(7, 64), (130, 72), (96, 576), (33, 5)])
def test_packed_linear_matches_torch(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    packed = ext.pack_weight(w)
    out = ext.packed_linear(x, packed, N, torch.empty(0))
    torch.testing.assert_close(out, x @ w.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        ext.packed_linear(x, packed, N, b), x @ w.T + b, atol=1e-4, rtol=1e-4
    )
