"""Paged attention in plain torch: the CPU path (and the reference the Triton path must match).

No Python loop over sequences or blocks: K/V are gathered through the block tables in one
indexing op per layer, then scaled_dot_product_attention runs on the padded batch. Decode rows
(one query token) and prefill rows are handled as two groups so one long prompt does not pad
every decode row to its length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionMetadata


class TorchAttentionBackend:
    name = "torch"

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, key)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, value)

    def forward(
        self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if meta.is_decode_only:
            return _decode(query, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
        return _mixed(query, k_cache, v_cache, meta, scale)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """(N, bs, Hkv, D) paged cache -> (B, Hkv, L, D) contiguous K or V, L = max_len rounded to blocks."""
    N, block_size, Hkv, D = cache.shape
    num_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_blocks].reshape(-1).long()
    B = block_tables.shape[0]
    # index_select over whole blocks (one contiguous row each) is ~2x faster than x[tables].
    x = cache.view(N, -1).index_select(0, tables)  # (B * nb, bs * Hkv * D)
    return x.view(B, num_blocks * block_size, Hkv, D).transpose(1, 2)


def _decode(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    max_len = int(context_lens.max())
    k = _gather(k_cache, block_tables, max_len)  # (B, Hkv, L, D)
    v = _gather(v_cache, block_tables, max_len)
    L = k.shape[2]
    # GQA without repeating K/V: the query heads of one KV group play the role of query rows.
    qg = q.view(B, Hkv, Hq // Hkv, D)  # (B, Hkv, g, D)
    mask = torch.arange(L, device=q.device)[None, :] < context_lens[:, None].to(q.device)  # (B, L)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(B, Hq, D)


def _mixed(q, k_cache, v_cache, meta: AttentionMetadata, scale) -> torch.Tensor:
    """A batch with at least one multi-token (prefill) sequence."""
    out = torch.empty_like(q)
    is_decode = meta.query_lens == 1
    starts = meta.cu_seqlens_q[:-1].long()
    if bool(is_decode.any()):
        rows = starts[is_decode]
        out[rows] = _decode(
            q[rows],
            k_cache,
            v_cache,
            meta.block_tables[is_decode],
            meta.context_lens[is_decode],
            scale,
        )
    prefill = ~is_decode
    out_rows, res = _prefill(
        q,
        k_cache,
        v_cache,
        meta.block_tables[prefill],
        meta.context_lens[prefill],
        meta.query_lens[prefill],
        starts[prefill],
        scale,
    )
    out[out_rows] = res
    return out


def _prefill(q, k_cache, v_cache, block_tables, context_lens, query_lens, starts, scale):
    """Padded causal attention for sequences with several new tokens over their paged prefix."""
    B = query_lens.shape[0]
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    g = Hq // Hkv
    max_q = int(query_lens.max())
    k = _gather(k_cache, block_tables, int(context_lens.max()))  # (B, Hkv, L, D)
    v = _gather(v_cache, block_tables, int(context_lens.max()))
    L = k.shape[2]
    offs = torch.arange(max_q, device=q.device)
    valid = offs[None, :] < query_lens[:, None]  # (B, Q)
    rows = (starts[:, None] + offs[None, :]).masked_select(
        valid
    )  # flat token index of each valid slot
    qp = q.new_zeros(B, max_q, Hq, D)
    qp[valid] = q[rows]
    qp = qp.view(B, max_q, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * max_q, D)
    q_pos = (context_lens - query_lens)[:, None] + offs[None, :]  # (B, Q) absolute positions
    key_pos = torch.arange(L, device=q.device)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # (B, Q, L) causal (implies < context_len)
    mask = mask | ~valid[:, :, None]  # padded query rows: attend anywhere (discarded)
    mask = mask[:, None, None].expand(B, 1, g, max_q, L).reshape(B, 1, g * max_q, L)
    o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale)  # (B, Hkv, g*Q, D)
    o = o.view(B, Hkv, g, max_q, D).permute(0, 3, 1, 2, 4).reshape(B, max_q, Hq, D)
    return rows, o[valid]
