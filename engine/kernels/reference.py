"""Plain torch references for the paged-KV kernels.

These are the ground truth the Triton kernels and the vectorised CPU backend are tested against.
They loop over sequences, compute in float32 and favour being obviously correct over speed.

Layouts (see engine/attention/base.py):
    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim)
    block_tables:     (B, max_blocks) int32; row b lists the blocks of sequence b in order
    context_lens:     (B,) int32; tokens in the cache per sequence (including new ones)
GQA: query head h reads kv head h // (num_heads // num_kv_heads).
"""

from __future__ import annotations

import torch


def write_kv_ref(
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (N, bs, Hkv, D), written in place
    v_cache: torch.Tensor,  # (N, bs, Hkv, D), written in place
    slot_mapping: torch.Tensor,  # (T,) int64: block_id * bs + offset
) -> None:
    """Copy token t's K/V into slot slot_mapping[t] of the paged caches."""
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        block, offset = divmod(slot, block_size)
        k_cache[block, offset] = key[t]
        v_cache[block, offset] = value[t]


def paged_decode_attention_ref(
    q: torch.Tensor,  # (B, Hq, D)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, M) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float,
) -> torch.Tensor:  # (B, Hq, D)
    """One query token per sequence, sitting at the last position of its context."""
    out = torch.empty_like(q)
    for b, ctx in enumerate(context_lens.tolist()):
        k, v = gather_kv(k_cache, v_cache, block_tables[b], ctx)  # (ctx, Hkv, D) each
        out[b : b + 1] = attend(q[b : b + 1], k, v, [ctx - 1], scale)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,  # (T, Hq, D): the new tokens of all sequences, concatenated
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, M) int32
    cu_seqlens_q: torch.Tensor,  # (B + 1,) int32
    context_lens: torch.Tensor,  # (B,) int32, total tokens in the cache incl. the new ones
    scale: float,
) -> torch.Tensor:  # (T, Hq, D)
    """Sequence b's query tokens are its last query_len positions, causal over the prefix."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        k, v = gather_kv(k_cache, v_cache, block_tables[b], ctx)
        positions = list(range(ctx - (end - start), ctx))
        out[start:end] = attend(q[start:end], k, v, positions, scale)
    return out


def gather_kv(
    k_cache: torch.Tensor,  # (N, bs, Hkv, D)
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # (M,) int32
    ctx: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (ctx, Hkv, D) each
    """The first ctx cached tokens of one sequence, in position order."""
    block_size = k_cache.shape[1]
    num_blocks = -(-ctx // block_size)
    blocks = block_table[:num_blocks].long()
    k = k_cache[blocks].flatten(0, 1)[:ctx]  # (num_blocks * bs, Hkv, D) -> (ctx, Hkv, D)
    v = v_cache[blocks].flatten(0, 1)[:ctx]
    return k, v


def attend(
    q: torch.Tensor,  # (L, Hq, D)
    k: torch.Tensor,  # (S, Hkv, D)
    v: torch.Tensor,  # (S, Hkv, D)
    positions: list[int],  # absolute position of each of the L queries
    scale: float,
) -> torch.Tensor:  # (L, Hq, D) in q's dtype
    """Causal softmax attention in float32: query i sees keys 0..positions[i]."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # (S, Hq, D)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("lhd,shd->hls", q.float(), k) * scale  # (Hq, L, S)
    key_pos = torch.arange(k.shape[0], device=k.device)
    query_pos = torch.tensor(positions, device=k.device)
    future = key_pos[None, :] > query_pos[:, None]  # (L, S)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hls,shd->lhd", probs, v).to(q.dtype)
