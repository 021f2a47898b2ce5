"""Paged attention with the Triton kernels of engine/kernels: the CUDA path.

On CPU the same kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before this
module is imported), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionMetadata
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.prefill_attention import paged_prefill_attention
from engine.kernels.write_kv import write_kv


class TritonAttentionBackend:
    """Decode-only batches use the split-K decode kernel, other batches the varlen prefill kernel.

    Checking metadata values (block ids in range, lengths consistent) syncs with the device, so
    it runs once per AttentionMetadata object, i.e. once per step rather than once per layer.
    This relies on metadata tensors not being modified after the first layer has used them.
    Shapes, dtypes and strides are checked on every call.
    """

    name = "triton"

    def __init__(self) -> None:
        self._slots_checked_for: AttentionMetadata | None = None
        self._context_checked_for: AttentionMetadata | None = None

    def write_kv(
        self,
        key: torch.Tensor,  # (T, Hkv, D)
        value: torch.Tensor,  # (T, Hkv, D)
        k_cache: torch.Tensor,  # (N, bs, Hkv, D)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        validate = meta is not self._slots_checked_for
        write_kv(key, value, k_cache, v_cache, meta.slot_mapping, validate=validate)
        self._slots_checked_for = meta

    def forward(
        self,
        query: torch.Tensor,  # (T, Hq, D)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (T, Hq, D)
        validate = meta is not self._context_checked_for
        if meta.is_decode_only:
            out = self._decode(query, k_cache, v_cache, meta, scale, validate)
        else:
            out = paged_prefill_attention(
                query, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
                meta.context_lens, scale, max_query_len=meta.max_query_len, validate=validate,
            )  # fmt: skip
        self._context_checked_for = meta
        return out

    @staticmethod
    def _decode(query, k_cache, v_cache, meta: AttentionMetadata, scale, validate) -> torch.Tensor:
        """One new token per sequence, so row b of query belongs to sequence b."""
        if query.shape[0] != meta.num_seqs:
            raise ValueError(
                f"a decode-only batch has one token per sequence: got {query.shape[0]} tokens "
                f"for {meta.num_seqs} sequences"
            )
        return paged_decode_attention(
            query, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
            max_context_len=meta.max_context_len, validate=validate,
        )  # fmt: skip
