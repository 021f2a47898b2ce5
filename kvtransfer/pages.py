"""Byte-level access to the pages of a KV pool tensor (block <-> bytes)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from kvtransfer.checksum import crc32
from kvtransfer.layout import KVLayout, block_runs, dtype_name

_PIECE = 512 << 10  # copy+checksum granule: stays in a core's L2 cache


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
        shape = (len(layers), 2, len(block_ids), self.layout.page_bytes)
        if out is not None:
            if (
                out.dtype != torch.uint8
                or out.numel() != math.prod(shape)
                or not out.is_contiguous()
            ):
                raise ValueError(
                    f"out must be a contiguous uint8 buffer of {math.prod(shape)} bytes"
                )
            if self.device.type != "cpu":
                out.view(shape).copy_(self.gather(layers, block_ids))
                return out.view(shape)
            self._copy(layers, block_ids, self._as_rows(out, len(layers), len(block_ids)), False)
            return out.view(shape)
        rows = self._rows.new_empty((len(layers) * 2, len(block_ids), self._rows.shape[2]))
        self._copy(layers, block_ids, rows, False)
        pages = rows.view(torch.uint8).view(shape)
        return pages.cpu() if pages.device.type != "cpu" else pages

    def scatter(self, layers: Sequence[int], block_ids: Sequence[int], pages: torch.Tensor) -> None:
        """Write `pages` (len(layers), 2, len(block_ids), page_bytes) uint8 into the pool."""
        self.check_layers(layers)
        self.check_blocks(block_ids)
        expected = (len(layers), 2, len(block_ids), self.layout.page_bytes)
        if tuple(pages.shape) != expected or pages.dtype != torch.uint8:
            raise ValueError(
                f"pages must be uint8 {expected}, got {pages.dtype} {tuple(pages.shape)}"
            )
        src = self._as_rows(pages.to(self.device).contiguous(), len(layers), len(block_ids))
        self._copy(layers, block_ids, src, True)

    def _as_rows(self, buf: torch.Tensor, num_layers: int, num_blocks: int) -> torch.Tensor:
        """A uint8 buffer of pages as (num_layers * 2, num_blocks, words) in the pool's word."""
        return buf.view(self._rows.dtype).view(num_layers * 2, num_blocks, -1)

    def _copy(
        self, layers: Sequence[int], block_ids: Sequence[int], buf: torch.Tensor, to_pool: bool
    ) -> None:
        """Copy between the pool and `buf` (len(layers) * 2, len(block_ids), words).

        Consecutive layers are one slice of rows; runs of consecutive block ids are one strided
        `copy_` each (as fast as a flat copy) when the ids come in a few long runs; otherwise
        one index_select / index_copy_ per slice of rows (index_copy_ is ~2x slower)."""
        runs = block_runs(block_ids)
        by_runs = len(runs) <= max(1, len(block_ids) // 8)
        idx = None if by_runs else _index(block_ids, self.device)
        for pool_row, buf_row, count in _layer_runs(layers):
            pool_part = self._rows[pool_row : pool_row + count]
            buf_part = buf[buf_row : buf_row + count]
            if by_runs:
                pos = 0
                for first, n in runs:
                    if to_pool:
                        pool_part[:, first : first + n].copy_(buf_part[:, pos : pos + n])
                    else:
                        buf_part[:, pos : pos + n].copy_(pool_part[:, first : first + n])
                    pos += n
            elif to_pool:
                pool_part.index_copy_(1, idx, buf_part)
            else:
                torch.index_select(pool_part, 1, idx, out=buf_part)

    def host_bytes(self) -> memoryview:
        """The whole pool as one writable byte view (CPU pools only)."""
        if self.device.type != "cpu":
            raise ValueError(f"the pool is on {self.device}, not in host memory")
        return memoryview(self._pages.numpy()).cast("B")

    def page_offsets(self, layers: Sequence[int], block_ids: Sequence[int]) -> list[int]:
        """Byte offset in `host_bytes()` of each page, in transfer order (layer, kind, block)."""
        pb, nb = self.layout.page_bytes, self.layout.num_blocks
        return [
            ((layer * 2 + kind) * nb + block) * pb
            for layer in layers
            for kind in (0, 1)
            for block in block_ids
        ]

    def page_ranges(self, layers: Sequence[int], block_ids: Sequence[int]) -> Iterator[memoryview]:
        """The pages of `block_ids` in `layers`, in transfer order (layer, kind, block), as
        consecutive byte views. On a CPU pool these are views of the pool itself (one per run of
        consecutive block ids: no copy); elsewhere one layer at a time is copied to the host."""
        self.check_layers(layers)
        self.check_blocks(block_ids)
        if self.device.type != "cpu":
            for layer in layers:
                yield memoryview(self.gather([layer], block_ids).numpy()).cast("B")
            return
        flat = self.host_bytes()
        pb, nb = self.layout.page_bytes, self.layout.num_blocks
        runs = block_runs(block_ids)
        for layer in layers:
            for kind in (0, 1):
                row = (layer * 2 + kind) * nb
                for first, count in runs:
                    yield flat[(row + first) * pb : (row + first + count) * pb]

    def copy_out(self, layers: Sequence[int], block_ids: Sequence[int], out: memoryview) -> int:
        """Gather pages into a byte buffer (transfer order) and return the CRC-32 of the bytes
        written (CPU pools only). See `_copy_bytes`."""
        return self._copy_bytes(layers, block_ids, out, to_pool=False)

    def copy_in(self, layers: Sequence[int], block_ids: Sequence[int], src: memoryview) -> int:
        """Scatter a byte buffer of pages (transfer order) into the pool and return the CRC-32
        of the bytes as they were read (CPU pools only). See `_copy_bytes`."""
        return self._copy_bytes(layers, block_ids, src, to_pool=True)

    def _copy_bytes(
        self, layers: Sequence[int], block_ids: Sequence[int], buf: memoryview, *, to_pool: bool
    ) -> int:
        """Plain memcpy of each run of consecutive pages (one thread: no stragglers when the
        cores are busy), in pieces of at most _PIECE bytes, each checksummed right after its
        copy while it is still in the CPU cache -- a second pass over the whole buffer would
        cost about as much as the copy."""
        self.check_layers(layers)
        self.check_blocks(block_ids)
        buf = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        if len(buf) != len(layers) * 2 * len(block_ids) * self.layout.page_bytes:
            raise ValueError(f"buffer of {len(buf)} bytes does not fit the pages")
        pool = self.host_bytes()
        pb, nb = self.layout.page_bytes, self.layout.num_blocks
        runs = block_runs(block_ids)
        crc, pos = 0, 0
        for layer in layers:
            for kind in (0, 1):
                row = (layer * 2 + kind) * nb
                for first, count in runs:
                    start, end = (row + first) * pb, (row + first + count) * pb
                    while start < end:
                        n = min(end - start, _PIECE)
                        piece = buf[pos : pos + n]
                        if to_pool:
                            pool[start : start + n] = piece
                        else:
                            piece[:] = pool[start : start + n]
                        crc = crc32(piece, crc)
                        start += n
                        pos += n
        return crc

    def fill(self, block_ids: Sequence[int], byte: int) -> None:
        """Overwrite every page of `block_ids` (all layers, K and V) with one byte value."""
        self.check_blocks(block_ids)
        self._pages.view(-1, self.layout.num_blocks, self.layout.page_bytes).index_fill_(
            1, _index(block_ids, self.device), byte
        )


def _layer_runs(layers: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first pool row, first buffer row, rows) per run of consecutive layers (2 rows each)."""
    runs: list[tuple[int, int, int]] = []
    for i, layer in enumerate(layers):
        if runs and 2 * layer == runs[-1][0] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 2)
        else:
            runs.append((2 * layer, 2 * i, 2))
    return runs


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=device)
