"""The seam between the model and attention implementations.

KV cache layout (one pool per engine, preallocated):
    kv_cache: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache[layer, 0] is the K cache of that layer, kv_cache[layer, 1] the V cache;
    kv_cache[layer, kind, block] is one contiguous byte range (what kvtransfer addresses).

A batch is flat ("varlen"): the new tokens of all sequences are concatenated, sequence by
sequence. For sequence b, its query tokens sit at absolute positions
    context_lens[b] - query_lens[b] ... context_lens[b] - 1
and attend causally to every cached token of the sequence (prefix + themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: (
        torch.Tensor
    )  # (T,) int64: flat slot (block_id * block_size + offset) per new token
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0 beyond a sequence's blocks
    context_lens: torch.Tensor  # (B,) int32: tokens in the cache after this step, per sequence
    query_lens: torch.Tensor  # (B,) int32: new tokens per sequence
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32: prefix sums of query_lens
    max_query_len: int
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """Writes new K/V into the paged pool and computes attention for a flat batch."""

    name: str

    def write_kv(
        self,
        key: torch.Tensor,  # (T, num_kv_heads, head_dim)
        value: torch.Tensor,  # (T, num_kv_heads, head_dim)
        k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None: ...

    def forward(
        self,
        query: torch.Tensor,  # (T, num_heads, head_dim)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (T, num_heads, head_dim)
        ...
