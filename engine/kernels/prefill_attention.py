"""Paged prefill attention over a flat (varlen) batch.

The new tokens of all sequences are concatenated; sequence b owns rows
cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1, which are the last query_len positions of its
context. Their K/V have already been written to the cache, so every key, from the cached prefix
and from the new tokens alike, is read through the block table. Masking is causal over absolute
positions, which also serves chunked prefill and decode tokens mixed into the same batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import launch_checks as checks
from engine.kernels.tiles import (
    LOG2E,
    NUM_STAGES,
    dot_in_fp32,
    kv_tile_width,
    load_kv_tile,
    online_softmax_step,
)

MAX_BLOCK_M = 64  # query tokens per program


@triton.jit
def _prefill_kernel(
    q_ptr,  # (T, Hq, D)
    k_cache_ptr,  # (N, bs, Hkv, D)
    v_cache_ptr,
    block_tables_ptr,  # (B, M) int32
    cu_seqlens_q_ptr,  # (B + 1,) int32
    context_lens_ptr,  # (B,) int32
    out_ptr,  # (T, Hq, D)
    stride_qt,
    stride_qh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bt,
    stride_ot,
    stride_oh,
    qk_scale,  # softmax scale * log2(e)
    block_size,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Grid (cdiv(max_query_len, BLOCK_M), B, Hq): one tile of one sequence's queries, one head."""
    m_block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b).to(tl.int64)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:  # the grid is sized for the longest sequence
        return
    ctx = tl.load(context_lens_ptr + b)
    prefix = ctx - q_len  # tokens cached before this step's queries
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    row_mask = rows < q_len
    q_pos = prefix + rows  # (BLOCK_M,) absolute positions
    dims = tl.arange(0, HEAD_DIM)
    q_offs = (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_mask[:, None], other=0.0)  # (BLOCK_M, D)

    kv_head = head // GROUP
    key_end = tl.minimum(ctx, prefix + (m_block + 1) * BLOCK_M)  # causal bound of the last row
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b * stride_bt
    for tile_start in range(0, key_end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        valid = positions < key_end
        k = load_kv_tile(k_cache_ptr, bt_row, positions, valid, kv_head,
                         stride_cb, stride_co, stride_ch, block_size, HEAD_DIM)  # fmt: skip
        v = load_kv_tile(v_cache_ptr, bt_row, positions, valid, kv_head,
                         stride_cb, stride_co, stride_ch, block_size, HEAD_DIM)  # fmt: skip
        visible = valid[None, :] & (positions[None, :] <= q_pos[:, None])  # (BLOCK_M, BLOCK_N)
        m_i, l_i, acc = online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale,
                                            DOT_FP32)  # fmt: skip

    out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
    o_offs = (q_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offs, out, mask=row_mask[:, None])


def paged_prefill_attention(
    q: torch.Tensor,  # (T, Hq, D)
    k_cache: torch.Tensor,  # (N, bs, Hkv, D)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, M) int32
    cu_seqlens_q: torch.Tensor,  # (B + 1,) int32
    context_lens: torch.Tensor,  # (B,) int32, tokens in the cache incl. the new ones
    scale: float,
    *,
    max_query_len: int | None = None,
    validate: bool = True,
) -> torch.Tensor:  # (T, Hq, D)
    """Causal attention of every new token over its sequence's cached prefix and itself.

    max_query_len sizes the grid; computed from cu_seqlens_q when None. validate=False skips
    the value checks (block ids, context and query lengths), which sync with the device.
    """
    num_blocks, block_size, num_kv_heads, head_dim = checks.check_cache_pair(k_cache, v_cache)
    num_seqs = context_lens.shape[0]
    _check_prefill_args(q, k_cache, block_tables, cu_seqlens_q, context_lens, num_seqs,
                        num_kv_heads, head_dim)  # fmt: skip
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    if validate:
        longest = checks.check_query_lens(cu_seqlens_q, context_lens, q.shape[0])
        checks.check_context(block_tables, context_lens, num_blocks, block_size)
        checks.check_at_least("max_query_len", max_query_len, longest)
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_n = kv_tile_width(head_dim, q.dtype)
    block_m = min(MAX_BLOCK_M, 2 * block_n)  # q tile stays resident beside the K/V tiles
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, q.shape[1])
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E, block_size,
        GROUP=q.shape[1] // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_FP32=dot_in_fp32(_prefill_kernel, q.dtype), num_stages=NUM_STAGES,
    )  # fmt: skip
    return out


def _check_prefill_args(
    q, k_cache, block_tables, cu_seqlens_q, context_lens, num_seqs, num_kv_heads, head_dim
):
    checks.check_query("q", q, None, num_kv_heads, head_dim)
    checks.check_same_dtype(k_cache, q=q)
    checks.check_index("context_lens", context_lens, torch.int32, (num_seqs,))
    checks.check_index("cu_seqlens_q", cu_seqlens_q, torch.int32, (num_seqs + 1,))
    checks.check_block_tables(block_tables, num_seqs)
    checks.check_device(_prefill_kernel, q, k_cache, block_tables, cu_seqlens_q, context_lens)
