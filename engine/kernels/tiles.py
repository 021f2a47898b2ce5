"""Triton device functions shared by the paged attention kernels.

Softmax runs in base 2: scores are pre-multiplied by scale * log2(e) so exp2 can be used, and the
log-sum-exp values that partitions exchange are base-2 as well.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634
NUM_STAGES = 2  # software-pipelining depth of the key loops; K and V tiles are buffered per stage


def kv_tile_width(head_dim: int, dtype: torch.dtype) -> int:
    """Keys per K/V tile: narrower for wide rows, so pipelined K/V tiles fit in shared memory."""
    row_bytes = head_dim * torch.empty((), dtype=dtype).element_size()
    if row_bytes <= 256:
        return 64
    return 32 if row_bytes <= 512 else 16


def dot_in_fp32(kernel: object, dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast its tl.dot operands to float32.

    The Triton interpreter keeps bfloat16 values as raw uint16 bits and its tl.dot multiplies
    those bits as integers, so on the interpreter bfloat16 operands are upcast first (exact: the
    products of bf16 values are the same in fp32). Compiled kernels use the native bf16 dot.
    """
    return isinstance(kernel, InterpretedFunction) and dtype == torch.bfloat16


@triton.jit
def load_kv_tile(
    cache_ptr,  # (N, bs, Hkv, D), last dim contiguous
    block_table_ptr,  # row of this sequence: (M,) int32
    positions,  # (BLOCK_N,) token positions within the sequence
    valid,  # (BLOCK_N,) which positions exist
    kv_head,
    stride_cb,
    stride_co,
    stride_ch,
    block_size,
    HEAD_DIM: tl.constexpr,
):
    """Gather BLOCK_N cached tokens of one kv head through the block table: (BLOCK_N, D)."""
    page = tl.load(block_table_ptr + positions // block_size, mask=valid, other=0).to(tl.int64)
    row = page * stride_cb + (positions % block_size) * stride_co + kv_head * stride_ch
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(cache_ptr + row[:, None] + dims[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, DOT_FP32: tl.constexpr):
    """Fold one key tile into the running (max, sum, accumulator) of a query tile.

    q: (M, D), k and v: (N, D), visible: bool, m_i and l_i: (M,) fp32 base-2,
    acc: (M, D) fp32 (unnormalised output); visible broadcasts to (M, N). Every row must see at least one key in the first
    tile it is given, so m_i is finite afterwards and no NaN arises from fully masked rows.
    """
    if DOT_FP32:  # see dot_in_fp32
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (M, N) fp32
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc
