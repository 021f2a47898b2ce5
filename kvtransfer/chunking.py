"""Splitting pages into bounded, checksummed chunks, and putting them back together.

The sender walks the pages in a fixed order (layer, then kind K/V, then block) and cuts the byte
stream into chunks of at most `max_chunk_bytes`; each chunk says which byte range of which page
each of its slices is. The receiver trusts nothing: it checks the sequence number, the CRC-32, that
every slice addresses a requested page, that each page's bytes arrive in order with no gap or
overlap, and at the end that every page is complete.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kvtransfer.layout import KINDS

MAX_CHUNK_BYTES = 1 << 20  # hard cap: well under gRPC's default 4 MiB message limit
DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class PageSlice:
    layer: int
    kind: int  # 0 = K, 1 = V
    block_id: int
    offset: int  # byte offset inside the page
    length: int


@dataclass(slots=True)
class Chunk:
    seq: int
    slices: list[PageSlice]
    data: bytes
    crc32: int
    total_bytes: int  # bytes of the whole transfer


class TransferError(Exception):
    """A transfer that cannot be trusted: bad order, addresses, lengths or checksum."""


class ChecksumError(TransferError):
    pass


def clamp_chunk_bytes(requested: int) -> int:
    """0 means the default; anything above the hard cap is capped."""
    if requested < 0:
        raise ValueError(f"max_chunk_bytes must be >= 0, got {requested}")
    return min(requested or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)


def iter_chunks(
    layers: Sequence[int],
    block_ids: Sequence[int],
    page_bytes: int,
    read_layer: Callable[[int], memoryview],
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[Chunk]:
    """Chunks of the pages of `block_ids` in `layers`.

    `read_layer(layer)` returns that layer's pages as one buffer of 2 * len(block_ids) * page_bytes
    bytes, ordered (kind, block) -- what PagedKV.gather gives for one layer.
    """
    budget = clamp_chunk_bytes(max_chunk_bytes)
    total = len(layers) * len(KINDS) * len(block_ids) * page_bytes
    builder = _ChunkBuilder(budget, total)
    for layer in layers:
        buf = read_layer(layer)
        if len(buf) != len(KINDS) * len(block_ids) * page_bytes:
            raise ValueError(f"layer {layer}: buffer of {len(buf)} bytes, expected 2 x pages")
        for kind in KINDS:
            for i, block_id in enumerate(block_ids):
                base = (kind * len(block_ids) + i) * page_bytes
                yield from builder.add_page(layer, kind, block_id, buf[base : base + page_bytes])
    yield from builder.flush()


class _ChunkBuilder:
    def __init__(self, budget: int, total: int) -> None:
        self._budget = budget
        self._total = total
        self._seq = 0
        self._parts: list[memoryview] = []
        self._slices: list[PageSlice] = []
        self._size = 0

    def add_page(self, layer: int, kind: int, block_id: int, page: memoryview) -> Iterator[Chunk]:
        offset = 0
        while offset < len(page):
            n = min(len(page) - offset, self._budget - self._size)
            self._parts.append(page[offset : offset + n])
            self._slices.append(PageSlice(layer, kind, block_id, offset, n))
            self._size += n
            offset += n
            if self._size == self._budget:
                yield from self.flush()

    def flush(self) -> Iterator[Chunk]:
        if not self._parts:
            return
        data = b"".join(self._parts)
        yield Chunk(self._seq, self._slices, data, zlib.crc32(data), self._total)
        self._seq += 1
        self._parts, self._slices, self._size = [], [], 0


class ChunkAssembler:
    """Receives the chunks of one transfer into a staging tensor
    (len(layers), 2, len(block_ids), page_bytes) uint8, validating everything."""

    def __init__(self, layers: Sequence[int], block_ids: Sequence[int], page_bytes: int) -> None:
        self._layer_pos = {layer: i for i, layer in enumerate(layers)}
        self._block_pos = {block: i for i, block in enumerate(block_ids)}
        if len(self._layer_pos) != len(layers) or len(self._block_pos) != len(block_ids):
            raise ValueError("duplicate layers or block ids")
        self._page_bytes = page_bytes
        self._num_blocks = len(block_ids)
        self.staging = torch.empty((len(layers), 2, len(block_ids), page_bytes), dtype=torch.uint8)
        self._flat = memoryview(self.staging.numpy()).cast("B")
        self._received = [0] * (len(layers) * 2 * len(block_ids))  # bytes per page so far
        self.total_bytes = len(self._received) * page_bytes
        self._next_seq = 0
        self.bytes_received = 0

    def add(self, chunk: Chunk) -> None:
        self._check_envelope(chunk)
        data = memoryview(chunk.data)
        pos = 0
        for s in chunk.slices:
            page = self._page_index(s)
            if s.offset != self._received[page]:
                raise TransferError(
                    f"chunk {chunk.seq}: page (layer {s.layer}, kind {s.kind}, block {s.block_id}) "
                    f"offset {s.offset}, expected {self._received[page]}"
                )
            if s.length <= 0 or s.offset + s.length > self._page_bytes:
                raise TransferError(
                    f"chunk {chunk.seq}: slice length {s.length} out of page bounds"
                )
            start = page * self._page_bytes + s.offset
            self._flat[start : start + s.length] = data[pos : pos + s.length]
            self._received[page] += s.length
            pos += s.length
        self._next_seq += 1
        self.bytes_received += len(data)

    def finish(self) -> torch.Tensor:
        """The staging tensor, once every page is complete."""
        missing = sum(1 for n in self._received if n != self._page_bytes)
        if missing:
            raise TransferError(f"transfer incomplete: {missing} of {len(self._received)} pages")
        return self.staging

    def _check_envelope(self, chunk: Chunk) -> None:
        if chunk.seq != self._next_seq:
            raise TransferError(f"chunk seq {chunk.seq}, expected {self._next_seq}")
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise TransferError(
                f"chunk {chunk.seq} has {len(chunk.data)} bytes > {MAX_CHUNK_BYTES}"
            )
        if chunk.total_bytes != self.total_bytes:
            raise TransferError(
                f"sender announces {chunk.total_bytes} bytes, expected {self.total_bytes}"
            )
        if sum(s.length for s in chunk.slices) != len(chunk.data):
            raise TransferError(f"chunk {chunk.seq}: slice lengths do not add up to its data")
        if zlib.crc32(chunk.data) != chunk.crc32:
            raise ChecksumError(f"chunk {chunk.seq}: CRC-32 mismatch")

    def _page_index(self, s: PageSlice) -> int:
        layer = self._layer_pos.get(s.layer)
        block = self._block_pos.get(s.block_id)
        if layer is None or block is None or s.kind not in KINDS:
            raise TransferError(
                f"slice addresses a page not requested: layer {s.layer}, kind {s.kind}, "
                f"block {s.block_id}"
            )
        return (layer * 2 + s.kind) * self._num_blocks + block
