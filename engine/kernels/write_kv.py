"""KV write ("reshape_and_cache"): scatter new tokens' K/V into the paged caches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import launch_checks as checks


@triton.jit
def _write_kv_kernel(
    key_ptr,  # (T, Hkv, D)
    value_ptr,  # (T, Hkv, D)
    k_cache_ptr,  # (N, bs, Hkv, D)
    v_cache_ptr,
    slot_ptr,  # (T,) int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,  # cache strides: block, token-in-block, head (last dim is contiguous)
    stride_co,
    stride_ch,
    block_size,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,  # next power of two >= NUM_KV_HEADS
    HEAD_DIM: tl.constexpr,
):
    """One program per token: copy its (Hkv, D) K and V rows into its slot."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size

    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < NUM_KV_HEADS)[:, None]
    src_k = key_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = value_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    dst = block * stride_cb + offset * stride_co + heads[:, None] * stride_ch + dims[None, :]
    tl.store(k_cache_ptr + dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(src_v, mask=mask), mask=mask)


def write_kv(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (N, bs, Hkv, D), written in place
    v_cache: torch.Tensor,  # (N, bs, Hkv, D), written in place
    slot_mapping: torch.Tensor,  # (T,) int64: block_id * bs + offset
    *,
    validate: bool = True,
) -> None:
    """Write token t's K/V into slot slot_mapping[t]. Slots must be distinct.

    validate=False skips the slot range check, the only check that syncs with the device.
    """
    num_blocks, block_size, num_kv_heads, head_dim = checks.check_cache_pair(k_cache, v_cache)
    num_tokens = key.shape[0]
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be ({num_tokens}, {num_kv_heads}, {head_dim}), got {tuple(t.shape)}"
            )
        checks.check_last_dim_contiguous(name, t)
    checks.check_same_dtype(k_cache, key=key, value=value)
    checks.check_index("slot_mapping", slot_mapping, torch.int64, (num_tokens,))
    checks.check_device(_write_kv_kernel, key, value, k_cache, v_cache, slot_mapping)
    if validate:
        checks.check_slots(slot_mapping, num_blocks * block_size)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
    )  # fmt: skip
