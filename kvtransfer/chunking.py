"""Splitting pages into bounded, checksummed chunks, and putting them back together.

The pages of a read are always walked in one order -- layer (as requested), kind (K, V), block
(as requested) -- which makes them one byte stream of len(layers) * 2 * len(block_ids) *
page_bytes bytes. The sender cuts that stream into chunks of at most `max_chunk_bytes`, each with
the CRC-32 of its bytes. A chunk says where its bytes belong in one of two ways:

- *sliced*: a list of PageSlice(layer, kind, block_id, offset, length), one per page piece;
- *packed* (the reader asked for it): no slices, only `stream_offset`, the position of the
  chunk's first byte in the stream -- every byte's page follows from the read's own layer and
  block lists, so the sender cannot address a page that was not requested.

The receiver trusts nothing: it checks the sequence number, the size, the announced total and the
CRC-32 of every chunk before writing any of it; for sliced chunks, that every slice addresses a
requested page and each page's bytes arrive in order with no gap or overlap; for packed chunks,
that each chunk starts where the previous one ended; and at the end that every byte arrived.
It writes the bytes into a staging tensor or, on a CPU pool, straight into the destination pages.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from contract.errors import ErrorKind
from kvtransfer.checksum import crc32
from kvtransfer.layout import KINDS

if TYPE_CHECKING:
    from kvtransfer.pages import PagedKV

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
    slices: list[PageSlice]  # empty: a packed chunk (see stream_offset)
    data: bytes | memoryview
    crc32: int
    total_bytes: int  # bytes of the whole transfer
    stream_offset: int = 0  # packed chunks: position of data[0] in the transfer's byte stream


@dataclass(slots=True)
class ChunkParts:
    """A chunk before its bytes are put together: `parts` are views of the source pages (the
    encoder copies them once, straight into the message)."""

    seq: int
    stream_offset: int
    slices: list[PageSlice]  # empty: packed
    parts: list[memoryview] = field(default_factory=list)
    nbytes: int = 0
    crc32: int = 0

    def join(self) -> bytes:
        return b"".join(self.parts)


class TransferError(Exception):
    """A transfer that cannot be trusted: bad order, addresses, lengths or checksum."""

    kind = ErrorKind.INTERNAL


class ChecksumError(TransferError):
    kind = ErrorKind.DATA_LOSS


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
    *,
    packed: bool = False,
) -> Iterator[Chunk]:
    """Chunks of the pages of `block_ids` in `layers`.

    `read_layer(layer)` returns that layer's pages as one buffer of 2 * len(block_ids) * page_bytes
    bytes, ordered (kind, block) -- what PagedKV.gather gives for one layer.
    """
    per_layer = len(KINDS) * len(block_ids) * page_bytes
    total = len(layers) * per_layer

    def layer_buffers() -> Iterator[tuple[int, memoryview]]:
        for layer in layers:
            buf = read_layer(layer)
            if len(buf) != per_layer:
                raise ValueError(f"layer {layer}: buffer of {len(buf)} bytes, expected 2 x pages")
            yield layer, buf

    if packed:
        parts = iter_packed_parts((buf for _, buf in layer_buffers()), total, max_chunk_bytes)
    else:

        def pages() -> Iterator[tuple[int, int, int, memoryview]]:
            for layer, buf in layer_buffers():
                for kind in KINDS:
                    for i, block_id in enumerate(block_ids):
                        base = (kind * len(block_ids) + i) * page_bytes
                        yield layer, kind, block_id, buf[base : base + page_bytes]

        parts = iter_sliced_parts(pages(), total, max_chunk_bytes)
    for p in parts:
        yield Chunk(p.seq, p.slices, p.join(), p.crc32, total, p.stream_offset)


def iter_packed_parts(
    ranges: Iterable[memoryview], total: int, max_chunk_bytes: int
) -> Iterator[ChunkParts]:
    """Cut a byte stream, given as consecutive byte ranges, into packed chunks."""
    budget = clamp_chunk_bytes(max_chunk_bytes)
    chunk = ChunkParts(0, 0, [])
    for buf in ranges:
        buf = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        pos, n = 0, len(buf)
        while pos < n:
            take = min(n - pos, budget - chunk.nbytes)
            part = buf[pos : pos + take]
            chunk.parts.append(part)
            chunk.crc32 = crc32(part, chunk.crc32)
            chunk.nbytes += take
            pos += take
            if chunk.nbytes == budget:
                yield chunk
                chunk = ChunkParts(chunk.seq + 1, chunk.stream_offset + chunk.nbytes, [])
    if chunk.nbytes:
        yield chunk
    if chunk.stream_offset + chunk.nbytes != total:
        raise ValueError(f"pages add up to {chunk.stream_offset + chunk.nbytes} bytes, not {total}")


def iter_sliced_parts(
    pages: Iterable[tuple[int, int, int, memoryview]], total: int, max_chunk_bytes: int
) -> Iterator[ChunkParts]:
    """Chunks with one PageSlice per page piece, from (layer, kind, block_id, page bytes)."""
    budget = clamp_chunk_bytes(max_chunk_bytes)
    chunk = ChunkParts(0, 0, [])
    for layer, kind, block_id, page in pages:
        offset = 0
        while offset < len(page):
            n = min(len(page) - offset, budget - chunk.nbytes)
            part = page[offset : offset + n]
            chunk.parts.append(part)
            chunk.slices.append(PageSlice(layer, kind, block_id, offset, n))
            chunk.crc32 = crc32(part, chunk.crc32)
            chunk.nbytes += n
            offset += n
            if chunk.nbytes == budget:
                yield chunk
                chunk = ChunkParts(chunk.seq + 1, chunk.stream_offset + chunk.nbytes, [])
    if chunk.nbytes:
        yield chunk
    if chunk.stream_offset + chunk.nbytes != total:
        raise ValueError(f"pages add up to {chunk.stream_offset + chunk.nbytes} bytes, not {total}")


class ChunkAssembler:
    """Receives the chunks of one transfer, validating everything (see the module docstring).

    Without `into`, the bytes land in a staging tensor (len(layers), 2, len(block_ids),
    page_bytes) uint8 that `finish()` returns. With `into` (a CPU PagedKV) and `dst_block_ids`,
    each verified chunk is copied straight into the pages of `dst_block_ids` and `finish()`
    returns None: a transfer that fails half-way leaves those pages partly written, so they must
    be blocks nobody reads until the transfer has finished (a reservation for an import).
    """

    def __init__(
        self,
        layers: Sequence[int],
        block_ids: Sequence[int],
        page_bytes: int,
        *,
        into: PagedKV | None = None,
        dst_block_ids: Sequence[int] | None = None,
    ) -> None:
        self._layer_pos = {layer: i for i, layer in enumerate(layers)}
        self._block_pos = {block: i for i, block in enumerate(block_ids)}
        if len(self._layer_pos) != len(layers) or len(self._block_pos) != len(block_ids):
            raise ValueError("duplicate layers or block ids")
        self._page_bytes = page_bytes
        self._num_blocks = len(block_ids)
        num_pages = len(layers) * len(KINDS) * len(block_ids)
        self.total_bytes = num_pages * page_bytes
        if into is None:
            self.staging: torch.Tensor | None = torch.empty(
                (len(layers), 2, len(block_ids), page_bytes), dtype=torch.uint8
            )
            self._flat = memoryview(self.staging.numpy()).cast("B")
            # page i of the stream sits at i * page_bytes: one run
            self._page_at: Sequence[int] = range(0, self.total_bytes, page_bytes)
            runs = [(0, 0, self.total_bytes)]
        else:
            if dst_block_ids is None or len(dst_block_ids) != len(block_ids):
                raise ValueError("dst_block_ids must pair up with block_ids")
            if into.layout.page_bytes != page_bytes:
                raise ValueError("destination pages have another size")
            into.check_layers(layers)
            into.check_blocks(dst_block_ids)
            self.staging = None
            self._flat = into.host_bytes()
            self._page_at = into.page_offsets(layers, dst_block_ids)
            runs = _merge_runs(self._page_at, page_bytes)
        self._run_stream = [r[0] for r in runs]  # stream offset where each run starts
        self._runs = runs  # (stream offset, destination offset, length)
        self._received: list[int] | None = None  # sliced mode: bytes per page so far
        self._packed: bool | None = None
        self._next_seq = 0
        self.bytes_received = 0

    def add(self, chunk: Chunk) -> None:
        self._check_envelope(chunk)
        data = chunk.data if isinstance(chunk.data, memoryview) else memoryview(chunk.data)
        if not chunk.slices:
            self._add_packed(chunk, data)
        else:
            self._add_sliced(chunk, data)
        self._next_seq += 1
        self.bytes_received += len(data)

    def finish(self) -> torch.Tensor | None:
        """The staging tensor (None when writing into a pool), once every byte has arrived."""
        if self._packed:
            if self.bytes_received != self.total_bytes:
                raise TransferError(
                    f"transfer incomplete: {self.bytes_received} of {self.total_bytes} bytes"
                )
        else:
            received = self._received or []
            missing = sum(1 for n in received if n != self._page_bytes)
            missing += len(self._page_at) - len(received)
            if missing:
                raise TransferError(f"transfer incomplete: {missing} of {len(self._page_at)} pages")
        return self.staging

    def _mode(self, chunk: Chunk, packed: bool) -> None:
        if self._packed is None:
            self._packed = packed
            if not packed:
                self._received = [0] * len(self._page_at)
        elif self._packed != packed:
            raise TransferError(f"chunk {chunk.seq}: packed and sliced chunks mixed in one stream")

    def _add_packed(self, chunk: Chunk, data: memoryview) -> None:
        self._mode(chunk, True)
        start, n = chunk.stream_offset, len(data)
        if start != self.bytes_received:
            raise TransferError(
                f"chunk {chunk.seq} starts at byte {start}, expected {self.bytes_received}"
            )
        if start + n > self.total_bytes:
            raise TransferError(f"chunk {chunk.seq} runs past the end of the transfer")
        i = bisect.bisect_right(self._run_stream, start) - 1
        pos = 0
        while pos < n:
            run_start, dst, length = self._runs[i]
            off = start + pos - run_start
            take = min(length - off, n - pos)
            self._flat[dst + off : dst + off + take] = data[pos : pos + take]
            pos += take
            i += 1

    def _add_sliced(self, chunk: Chunk, data: memoryview) -> None:
        self._mode(chunk, False)
        received = self._received
        assert received is not None
        pos = 0
        for s in chunk.slices:
            page = self._page_index(s)
            if s.offset != received[page]:
                raise TransferError(
                    f"chunk {chunk.seq}: page (layer {s.layer}, kind {s.kind}, block {s.block_id}) "
                    f"offset {s.offset}, expected {received[page]}"
                )
            if s.length <= 0 or s.offset + s.length > self._page_bytes:
                raise TransferError(
                    f"chunk {chunk.seq}: slice length {s.length} out of page bounds"
                )
            start = self._page_at[page] + s.offset
            self._flat[start : start + s.length] = data[pos : pos + s.length]
            received[page] += s.length
            pos += s.length

    def _check_envelope(self, chunk: Chunk) -> None:
        if chunk.seq != self._next_seq:
            raise TransferError(f"chunk seq {chunk.seq}, expected {self._next_seq}")
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise TransferError(
                f"chunk {chunk.seq} has {len(chunk.data)} bytes > {MAX_CHUNK_BYTES}"
            )
        if not len(chunk.data):
            raise TransferError(f"chunk {chunk.seq} is empty")
        if chunk.total_bytes != self.total_bytes:
            raise TransferError(
                f"sender announces {chunk.total_bytes} bytes, expected {self.total_bytes}"
            )
        if chunk.slices and sum(s.length for s in chunk.slices) != len(chunk.data):
            raise TransferError(f"chunk {chunk.seq}: slice lengths do not add up to its data")
        if crc32(chunk.data) != chunk.crc32:
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


def _merge_runs(page_at: Sequence[int], page_bytes: int) -> list[tuple[int, int, int]]:
    """(stream offset, destination offset, length) runs: pages adjacent in the stream whose
    destinations are adjacent too are one run (one copy)."""
    runs: list[tuple[int, int, int]] = []
    for i, dst in enumerate(page_at):
        if runs and runs[-1][1] + runs[-1][2] == dst:
            start, first, length = runs[-1]
            runs[-1] = (start, first, length + page_bytes)
        else:
            runs.append((i * page_bytes, dst, page_bytes))
    return runs
