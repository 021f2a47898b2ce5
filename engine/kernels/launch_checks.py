"""Argument checks shared by the kernel launchers.

A Triton kernel given a wrong shape, stride or an out-of-range block id reads or writes the wrong
memory without complaint, so every launcher validates its inputs here first and raises ValueError
with a message that names the argument.
"""

from __future__ import annotations

import itertools

import torch
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM = 16  # tl.dot needs every dimension >= 16 on GPUs
MAX_HEAD_DIM = 256


def check_device(kernel: object, *tensors: torch.Tensor) -> None:
    """All tensors on one device, and a device this kernel can run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise ValueError(
            "Triton kernels run on CUDA tensors; on CPU they need the Triton interpreter "
            "(TRITON_INTERPRET=1 set before engine.kernels modules are imported)"
        )


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate the paged K/V caches; return (num_blocks, block_size, num_kv_heads, head_dim)."""
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be (num_blocks, block_size, num_kv_heads, head_dim), got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    if v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache strides {v_cache.stride()} != k_cache {k_cache.stride()}")
    check_float("k_cache", k_cache)
    check_same_dtype(k_cache, v_cache=v_cache)
    check_last_dim_contiguous("k_cache", k_cache)
    check_head_dim(k_cache.shape[3])
    return tuple(k_cache.shape)  # type: ignore[return-value]


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_dtype(ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != cache dtype {ref.dtype}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def check_head_dim(head_dim: int) -> None:
    power_of_two = head_dim & (head_dim - 1) == 0
    if not (power_of_two and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM):
        raise ValueError(
            f"head_dim must be a power of two in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}"
        )


def check_index(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """An index tensor of exact dtype and shape, contiguous along its last dimension."""
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dim() > 0 and t.numel() > 0:
        check_last_dim_contiguous(name, t)


def check_block_tables(block_tables: torch.Tensor, num_seqs: int) -> None:
    """(num_seqs, max_blocks) int32, one row per sequence."""
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be ({num_seqs}, max_blocks), got {tuple(block_tables.shape)}"
        )
    check_index("block_tables", block_tables, torch.int32, tuple(block_tables.shape))


def check_query(
    name: str, q: torch.Tensor, rows: int | None, num_kv_heads: int, head_dim: int
) -> None:
    """q: (rows, Hq, head_dim) with Hq a multiple of num_kv_heads."""
    if q.dim() != 3 or q.shape[2] != head_dim or (rows is not None and q.shape[0] != rows):
        expected = f"({rows if rows is not None else 'T'}, num_heads, {head_dim})"
        raise ValueError(f"{name} must be {expected}, got {tuple(q.shape)}")
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    check_last_dim_contiguous(name, q)


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Every slot in [0, num_slots). One host sync."""
    if slot_mapping.numel() == 0:
        return
    lo, hi = torch.stack([slot_mapping.min(), slot_mapping.max()]).tolist()
    if lo < 0 or hi >= num_slots:
        raise ValueError(f"slot_mapping values must be in [0, {num_slots}), got [{lo}, {hi}]")


def check_context(
    block_tables: torch.Tensor,  # (B, M) int32
    context_lens: torch.Tensor,  # (B,) int32
    num_blocks: int,
    block_size: int,
) -> int:
    """Block ids in range and 1 <= context_len <= M * block_size; returns the longest context.

    One host sync. Needs at least one sequence.
    """
    capacity = block_tables.shape[1] * block_size
    if block_tables.numel() == 0:
        raise ValueError("block_tables has no columns but context_lens is not empty")
    stats = torch.stack(
        [block_tables.min(), block_tables.max(), context_lens.min(), context_lens.max()]
    )
    bt_lo, bt_hi, ctx_lo, ctx_hi = stats.tolist()
    if bt_lo < 0 or bt_hi >= num_blocks:
        raise ValueError(
            f"block_tables values must be in [0, {num_blocks}), got [{bt_lo}, {bt_hi}]"
        )
    if ctx_lo < 1 or ctx_hi > capacity:
        raise ValueError(
            f"context_lens must be in [1, {capacity}] (block_tables columns * block_size), "
            f"got [{ctx_lo}, {ctx_hi}]"
        )
    return ctx_hi


def check_query_lens(
    cu_seqlens_q: torch.Tensor,  # (B + 1,) int32
    context_lens: torch.Tensor,  # (B,) int32
    num_tokens: int,
) -> int:
    """cu_seqlens_q runs from 0 to num_tokens and 1 <= query_len <= context_len.

    Returns the longest query.
    """
    cu = cu_seqlens_q.tolist()
    if cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens_q must run from 0 to {num_tokens}, got {cu[0]}..{cu[-1]}")
    for b, ctx in enumerate(context_lens.tolist()):
        query_len = cu[b + 1] - cu[b]
        if not 1 <= query_len <= ctx:
            raise ValueError(
                f"sequence {b}: query_len {query_len} must be in [1, context_len={ctx}]"
            )
    return max(b - a for a, b in itertools.pairwise(cu))


def check_at_least(name: str, given: int | None, actual: int) -> None:
    """A caller-supplied grid bound (None: not given) must cover the batch's actual maximum."""
    if given is not None and given < actual:
        raise ValueError(f"{name} is {given} but the batch needs {actual}")
