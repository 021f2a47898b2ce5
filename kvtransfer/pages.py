"""Byte-level access to the pages of a KV pool tensor (block <-> bytes)."""

from __future__ import annotations

import math
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
        # The same bytes as (num_layers * 2, num_blocks, words): index_select/index_copy_ along
        # dim 1 of a 3-D view of 8-byte words is many times faster than along dim 2 of 4-D bytes.
        word = torch.int64 if layout.page_bytes % 8 == 0 else torch.uint8
        self._rows = self._pages.view(word).view(layout.num_layers * 2, layout.num_blocks, -1)

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

    def gather(
        self, layers: Sequence[int], block_ids: Sequence[int], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copy pages to a CPU tensor (len(layers), 2, len(block_ids), page_bytes) uint8: a new
        one, or `out` (any contiguous CPU uint8 buffer of that many bytes)."""
        self.check_layers(layers)
        self.check_blocks(block_ids)
        if out is not None:
            return self._gather_into(layers, block_ids, out)
        idx = _index(block_ids, self.device)
        if self._all(layers):
            out = self._rows.index_select(1, idx)  # (num_layers * 2, nb, words)
        else:
            out = self._rows.new_empty((len(layers) * 2, len(block_ids), self._rows.shape[2]))
            for i, layer in enumerate(layers):
                torch.index_select(self._layer_rows(layer), 1, idx, out=out[2 * i : 2 * i + 2])
        out = out.view(torch.uint8).view(len(layers), 2, len(block_ids), self.layout.page_bytes)
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
        idx = _index(block_ids, self.device)
        # (len(layers) * 2, nb, words) in the pool's word type
        src = (
            pages.to(self.device)
            .contiguous()
            .view(self._rows.dtype)
            .view(len(layers) * 2, len(block_ids), -1)
        )
        if self._all(layers):
            self._rows.index_copy_(1, idx, src)
            return
        for i, layer in enumerate(layers):
            self._layer_rows(layer).index_copy_(1, idx, src[2 * i : 2 * i + 2])

    def fill(self, block_ids: Sequence[int], byte: int) -> None:
        """Overwrite every page of `block_ids` (all layers, K and V) with one byte value."""
        self.check_blocks(block_ids)
        self._pages.view(-1, self.layout.num_blocks, self.layout.page_bytes).index_fill_(
            1, _index(block_ids, self.device), byte
        )

    def _gather_into(
        self, layers: Sequence[int], block_ids: Sequence[int], out: torch.Tensor
    ) -> torch.Tensor:
        shape = (len(layers), 2, len(block_ids), self.layout.page_bytes)
        if out.dtype != torch.uint8 or out.numel() != math.prod(shape) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous uint8 buffer of {math.prod(shape)} bytes")
        if self.device.type != "cpu":
            out.view(shape).copy_(self.gather(layers, block_ids))
            return out.view(shape)
        rows = out.view(self._rows.dtype).view(len(layers) * 2, len(block_ids), -1)
        idx = _index(block_ids, self.device)
        for i, layer in enumerate(layers):
            torch.index_select(self._layer_rows(layer), 1, idx, out=rows[2 * i : 2 * i + 2])
        return out.view(shape)

    def _all(self, layers: Sequence[int]) -> bool:
        return list(layers) == list(range(self.layout.num_layers))

    def _layer_rows(self, layer: int) -> torch.Tensor:
        return self._rows[2 * layer : 2 * layer + 2]  # (2, num_blocks, words): K and V rows


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=device)
