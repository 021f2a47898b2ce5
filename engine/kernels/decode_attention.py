"""Paged decode attention with split-K ("flash-decoding").

Each sequence has one query token at the last position of its context. The context is cut into
partitions of PARTITION_SIZE tokens that separate programs process in parallel, so that a small
batch with long contexts still fills the GPU. Each program handles one (sequence, kv head,
partition) and all GROUP query heads sharing that kv head, so a K/V tile is read once per group.
Each partition leaves a normalised partial output and its base-2 log-sum-exp; a second small kernel
combines them. With a single partition the first kernel writes the output directly.
"""

from __future__ import annotations

import math

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

MIN_GROUP_PAD = 16  # tl.dot needs M >= 16 on GPUs: pad the query heads of a group
MIN_PARTITION_SIZE = 16
PROGRAMS_PER_SM = 2  # split the context until about this many programs per SM are running
COMBINE_CHUNK = 16  # partitions the combine kernel reads per loop step
MIN_GPU_PARTITION_SIZE = 256  # shorter partitions cost more in the combine step than they save


@triton.jit
def _decode_partition_kernel(
    q_ptr,  # (B, Hq, D)
    k_cache_ptr,  # (N, bs, Hkv, D)
    v_cache_ptr,
    block_tables_ptr,  # (B, M) int32
    context_lens_ptr,  # (B,) int32
    out_ptr,  # (B, Hq, D), written when SINGLE_PARTITION
    part_out_ptr,  # (B, Hq, P, D) fp32, written otherwise
    part_lse_ptr,  # (B, Hq, P) fp32
    stride_qb,
    stride_qh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bt,
    stride_ob,
    stride_oh,
    qk_scale,  # softmax scale * log2(e)
    block_size,
    num_partitions,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    SINGLE_PARTITION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Grid (B, Hkv, P): attention of one group of query heads over one context partition."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    start = part * PARTITION_SIZE
    if start >= ctx:  # the combine step never reads partitions past the context
        return
    end = tl.minimum(start + PARTITION_SIZE, ctx)

    g = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g  # (GROUP_PAD,) query heads of this group
    head_mask = g < GROUP
    q_offs = b * stride_qb + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=head_mask[:, None], other=0.0)  # (GROUP_PAD, D)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b * stride_bt
    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        valid = positions < end
        k = load_kv_tile(k_cache_ptr, bt_row, positions, valid, kv_head,
                         stride_cb, stride_co, stride_ch, block_size, HEAD_DIM)  # fmt: skip
        v = load_kv_tile(v_cache_ptr, bt_row, positions, valid, kv_head,
                         stride_cb, stride_co, stride_ch, block_size, HEAD_DIM)  # fmt: skip
        m_i, l_i, acc = online_softmax_step(q, k, v, valid[None, :], m_i, l_i, acc, qk_scale,
                                           DOT_FP32)  # fmt: skip

    out = acc / l_i[:, None]
    if SINGLE_PARTITION:
        o_offs = b * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        row = (b * tl.num_programs(1) * GROUP + heads) * num_partitions + part  # (GROUP_PAD,)
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=head_mask)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=head_mask[:, None])  # fmt: skip


@triton.jit
def _decode_combine_kernel(
    part_out_ptr,  # (B, Hq, P, D) fp32
    part_lse_ptr,  # (B, Hq, P) fp32
    context_lens_ptr,  # (B,) int32
    out_ptr,  # (B, Hq, D)
    stride_ob,
    stride_oh,
    num_partitions,
    HEAD_DIM: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    CHUNK: tl.constexpr,  # partitions read per loop step
):
    """Grid (B, Hq): weight each partition's output by its share of the softmax mass.

    Two passes over the partitions, CHUNK at a time so long contexts need no wide tiles: the
    first finds the largest log-sum-exp, the second sums the rescaled outputs and weights.
    """
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    used_parts = tl.cdiv(tl.load(context_lens_ptr + b), PARTITION_SIZE)
    first_row = (b * tl.num_programs(1) + head) * num_partitions
    lanes = tl.arange(0, CHUNK)
    dims = tl.arange(0, HEAD_DIM)

    lse_max = tl.full([CHUNK], float("-inf"), tl.float32)
    for p0 in range(0, used_parts, CHUNK):
        parts = p0 + lanes
        lse = tl.load(
            part_lse_ptr + first_row + parts, mask=parts < used_parts, other=float("-inf")
        )
        lse_max = tl.maximum(lse_max, lse)
    top = tl.max(lse_max, axis=0)  # finite: partition 0 always holds a token

    weights = tl.zeros([CHUNK], tl.float32)
    acc = tl.zeros([CHUNK, HEAD_DIM], tl.float32)
    for p0 in range(0, used_parts, CHUNK):
        parts = p0 + lanes
        used = parts < used_parts
        lse = tl.load(part_lse_ptr + first_row + parts, mask=used, other=float("-inf"))
        w = tl.exp2(lse - top)  # (CHUNK,), 0 for unused lanes
        rows = (first_row + parts)[:, None] * HEAD_DIM + dims[None, :]
        acc += w[:, None] * tl.load(part_out_ptr + rows, mask=used[:, None], other=0.0)
        weights += w
    out = tl.sum(acc, axis=0) / tl.sum(weights, axis=0)  # (D,)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,  # (B, Hq, D)
    k_cache: torch.Tensor,  # (N, bs, Hkv, D)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, M) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float,
    *,
    max_context_len: int | None = None,
    partition_size: int | None = None,
    validate: bool = True,
) -> torch.Tensor:  # (B, Hq, D)
    """Attention of each sequence's single query token over its whole cached context.

    max_context_len sizes the partition grid; computed from context_lens when None.
    partition_size: tokens per split-K partition, a power of two >= 16; None picks one from
    the batch shape and the device. validate=False skips the value checks (block ids in range,
    context lengths within the block table), which sync with the device; shapes, dtypes and
    strides are always checked.
    """
    num_blocks, block_size, num_kv_heads, head_dim = checks.check_cache_pair(k_cache, v_cache)
    num_seqs = q.shape[0]
    _check_decode_args(q, k_cache, block_tables, context_lens, num_seqs, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if validate:
        longest = checks.check_context(block_tables, context_lens, num_blocks, block_size)
        checks.check_at_least("max_context_len", max_context_len, longest)
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    if partition_size is None:
        partition_size = choose_partition_size(num_seqs, num_kv_heads, max_context_len, q.device)
    _check_partition_size(partition_size)
    num_partitions = triton.cdiv(max_context_len, partition_size)
    _launch(q, k_cache, v_cache, block_tables, context_lens, out, scale,
            partition_size, num_partitions)  # fmt: skip
    return out


def _check_decode_args(q, k_cache, block_tables, context_lens, num_seqs, num_kv_heads, head_dim):
    checks.check_query("q", q, None, num_kv_heads, head_dim)
    checks.check_same_dtype(k_cache, q=q)
    checks.check_index("context_lens", context_lens, torch.int32, (num_seqs,))
    checks.check_block_tables(block_tables, num_seqs)
    checks.check_device(_decode_partition_kernel, q, k_cache, block_tables, context_lens)


def _check_partition_size(partition_size: int) -> None:
    power_of_two = partition_size & (partition_size - 1) == 0
    if partition_size < MIN_PARTITION_SIZE or not power_of_two:
        raise ValueError(
            f"partition_size must be a power of two >= {MIN_PARTITION_SIZE}, got {partition_size}"
        )


def choose_partition_size(
    num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device
) -> int:
    """Split the context only as far as needed to give every SM work; one partition on CPU."""
    whole = max(MIN_PARTITION_SIZE, triton.next_power_of_2(max_context_len))
    if device.type != "cuda":
        return whole
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = math.ceil(PROGRAMS_PER_SM * sms / (num_seqs * num_kv_heads))
    size = triton.next_power_of_2(math.ceil(max_context_len / splits))
    return min(whole, max(MIN_GPU_PARTITION_SIZE, size))


def _launch(q, k_cache, v_cache, block_tables, context_lens, out, scale, partition_size, parts):
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    single = parts == 1
    # (B, Hq, P) log-sum-exps and (B, Hq, P, D) partial outputs; unused with one partition
    lse_shape = (num_seqs, num_heads, parts) if not single else (1,)
    part_lse = q.new_empty(lse_shape, dtype=torch.float32)
    part_out = q.new_empty((*lse_shape, head_dim), dtype=torch.float32)
    block_n = min(kv_tile_width(head_dim, q.dtype), partition_size)
    _decode_partition_kernel[(num_seqs, num_kv_heads, parts)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E, k_cache.shape[1], parts,
        GROUP=group, GROUP_PAD=max(MIN_GROUP_PAD, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_N=block_n, PARTITION_SIZE=partition_size,
        SINGLE_PARTITION=single, DOT_FP32=dot_in_fp32(_decode_partition_kernel, q.dtype),
        num_stages=NUM_STAGES,
    )  # fmt: skip
    if single:
        return
    _decode_combine_kernel[(num_seqs, num_heads)](
        part_out, part_lse, context_lens, out, out.stride(0), out.stride(1), parts,
        HEAD_DIM=head_dim, PARTITION_SIZE=partition_size, CHUNK=COMBINE_CHUNK,
    )  # fmt: skip
