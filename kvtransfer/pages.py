"""Byte-level access to the pages of a KV pool tensor (block <-> bytes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtransfer.layout import KVLayout, dtype_name


class KVAddressError(ValueError):
    """A block id or layer outside the pool, or a malformed id list."""


class PagedKV:
    """Reads and writes whole pages of one KV pool.

    Thread-safety: the caller guarantees the blocks it touches are not used by the engine at the
    same time (held by a lease on the prefill side, reserved for import on the decode side).
    """

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        expected = (
            layout.num_layers,
            2,
            layout.num_blocks,
            layout.block_size,
            layout.num_kv_heads,
            layout.head_dim,
        )
        if tuple(kv_cache.shape) != expected:
            raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} != layout {expected}")
        if dtype_name(kv_cache.dtype) != layout.dtype:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} != layout dtype {layout.dtype}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous")
        self.layout = layout
        self.device = kv_cache.device
        # (num_layers, 2, num_blocks, page_bytes): one row per page, sharing kv_cache's storage.
        self._pages = kv_cache.view(torch.uint8).view(
            layout.num_layers, 2, layout.num_blocks, layout.page_bytes
        )

    def check_blocks(self, block_ids: Sequence[int]) -> None:
        if not block_ids:
            raise KVAddressError("block id list is empty")
        bad = [b for b in block_ids if not 0 <= b < self.layout.num_blocks]
        if bad:
            raise KVAddressError(f"block ids out of range [0, {self.layout.num_blocks}): {bad[:8]}")
        if len(set(block_ids)) != len(block_ids):
            raise KVAddressError("block id list has duplicates")

    def check_layers(self, layers: Sequence[int]) -> None:
        if not layers:
            raise KVAddressError("layer list is empty")
        bad = [layer for layer in layers if not 0 <= layer < self.layout.num_layers]
        if bad:
            raise KVAddressError(f"layers out of range [0, {self.layout.num_layers}): {bad[:8]}")
        if len(set(layers)) != len(layers):
            raise KVAddressError("layer list has duplicates")

    def gather(self, layers: Sequence[int], block_ids: Sequence[int]) -> torch.Tensor:
        """Copy pages to a new CPU tensor (len(layers), 2, len(block_ids), page_bytes) uint8."""
        self.check_layers(layers)
        self.check_blocks(block_ids)
        pages = self._pages
        if list(layers) != list(range(self.layout.num_layers)):
            pages = pages.index_select(0, _index(layers, self.device))
        out = pages.index_select(2, _index(block_ids, self.device))  # (nl, 2, nb, page_bytes)
        return out.cpu() if out.device.type != "cpu" else out

    def scatter(self, layers: Sequence[int], block_ids: Sequence[int], pages: torch.Tensor) -> None:
        """Write `pages` (len(layers), 2, len(block_ids), page_bytes) uint8 into the pool."""
        self.check_layers(layers)
        self.check_blocks(block_ids)
        expected = (len(layers), 2, len(block_ids), self.layout.page_bytes)
        if tuple(pages.shape) != expected or pages.dtype != torch.uint8:
            raise ValueError(
                f"pages must be uint8 {expected}, got {pages.dtype} {tuple(pages.shape)}"
            )
        layer_idx = _index(layers, self.device).view(-1, 1, 1)
        kind_idx = torch.arange(2, device=self.device).view(1, -1, 1)
        block_idx = _index(block_ids, self.device).view(1, 1, -1)
        self._pages.index_put_((layer_idx, kind_idx, block_idx), pages.to(self.device))

    def fill(self, block_ids: Sequence[int], byte: int) -> None:
        """Overwrite every page of `block_ids` (all layers, K and V) with one byte value."""
        self.check_blocks(block_ids)
        self._pages[:, :, _index(block_ids, self.device)] = byte


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=device)
