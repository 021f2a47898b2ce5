"""The copy-saving paths of kvtransfer: packed chunks, chunks written straight into a pool,
KVChunk wire bytes without protobuf copies, checksummed copies, reused shared-memory segments,
several streams / pieces per pull."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
from test_kvtransfer_service import LAYOUT, Peer, pool

from kvtransfer import wire
from kvtransfer.checksum import crc32
from kvtransfer.chunking import (
    ChecksumError,
    ChunkAssembler,
    ChunkParts,
    PageSlice,
    TransferError,
    iter_chunks,
)
from kvtransfer.layout import KVLayout
from kvtransfer.pages import PagedKV
from kvtransfer.shm import ShmExporter, ShmReader, read_segment
from protos.pdserve.v1 import kvtransfer_pb2


def make_layout(num_blocks: int = 12) -> KVLayout:
    return KVLayout(
        model_fingerprint="fp",
        dtype="float32",
        num_layers=3,
        num_kv_heads=2,
        head_dim=8,
        block_size=4,
        num_blocks=num_blocks,
    )  # page = 256 bytes


def make_pool(layout: KVLayout, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (layout.num_layers, 2, layout.num_blocks, layout.block_size, layout.num_kv_heads,
             layout.head_dim)  # fmt: skip
    return torch.randn(shape, generator=g)


def packed_chunks(pool_t, layout, layers, blocks, max_chunk):
    paged = PagedKV(pool_t, layout)

    def read_layer(layer):
        return memoryview(paged.gather([layer], blocks).numpy()).cast("B")

    return list(iter_chunks(layers, blocks, layout.page_bytes, read_layer, max_chunk, packed=True))


def test_checksum_matches_zlib_and_chains():
    data = os.urandom(100_000)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[5000:], crc32(data[:5000])) == zlib.crc32(data)
    assert crc32(memoryview(data)[7:]) == zlib.crc32(data[7:])


@pytest.mark.parametrize("max_chunk", [100, 256, 1000, 0])
def test_packed_chunks_reassemble_into_staging(max_chunk):
    layout = make_layout()
    src = make_pool(layout)
    layers, blocks = [0, 2], [9, 0, 4]
    chunks = packed_chunks(src, layout, layers, blocks, max_chunk)
    assert all(not c.slices for c in chunks)
    assert [c.stream_offset for c in chunks] == [sum(len(c.data) for c in chunks[:i])
                                                 for i in range(len(chunks))]  # fmt: skip
    assembler = ChunkAssembler(layers, blocks, layout.page_bytes)
    for c in chunks:
        assembler.add(c)
    assert torch.equal(assembler.finish(), PagedKV(src, layout).gather(layers, blocks))


@pytest.mark.parametrize("packed", [True, False])
def test_chunks_written_straight_into_the_destination_blocks(packed):
    layout = make_layout()
    src = make_pool(layout)
    dst = torch.zeros_like(src)
    before = dst.clone()
    layers, blocks, dst_blocks = [0, 1, 2], [3, 4, 5, 9], [7, 8, 2, 10]  # runs on both sides
    paged = PagedKV(src, layout)

    def read_layer(layer):
        return memoryview(paged.gather([layer], blocks).numpy()).cast("B")

    chunks = iter_chunks(layers, blocks, layout.page_bytes, read_layer, 300, packed=packed)
    assembler = ChunkAssembler(
        layers, blocks, layout.page_bytes, into=PagedKV(dst, layout), dst_block_ids=dst_blocks
    )
    for c in chunks:
        assembler.add(c)
    assert assembler.finish() is None
    for s, d in zip(blocks, dst_blocks, strict=True):
        assert torch.equal(dst[:, :, d], src[:, :, s])
    untouched = [b for b in range(layout.num_blocks) if b not in dst_blocks]
    assert torch.equal(dst[:, :, untouched], before[:, :, untouched])


def test_packed_chunk_checks():
    layout = make_layout()
    src = make_pool(layout)
    chunks = packed_chunks(src, layout, [0, 1, 2], [1, 2], 500)

    def assemble(cs, blocks=(1, 2)):
        a = ChunkAssembler([0, 1, 2], list(blocks), layout.page_bytes)
        for c in cs:
            a.add(c)
        return a.finish()

    bad = dataclasses.replace(chunks[1], data=bytes([chunks[1].data[0] ^ 1]) + chunks[1].data[1:])
    with pytest.raises(ChecksumError):
        assemble([chunks[0], bad] + chunks[2:])
    moved = dataclasses.replace(chunks[1], stream_offset=chunks[1].stream_offset + 4)
    with pytest.raises(TransferError, match="starts at byte"):
        assemble([chunks[0], moved])
    with pytest.raises(TransferError, match="incomplete"):
        assemble(chunks[:-1])
    with pytest.raises(TransferError, match="announces"):
        assemble(chunks, blocks=(1, 2, 3))
    sliced = packed_chunks(src, layout, [0, 1, 2], [1, 2], 500)[1]
    sliced = dataclasses.replace(sliced, slices=[PageSlice(0, 0, 1, 0, len(sliced.data))])
    with pytest.raises(TransferError, match="mixed"):
        assemble([chunks[0], sliced])
    empty = dataclasses.replace(chunks[0], data=b"", crc32=0)
    with pytest.raises(TransferError, match="empty"):
        assemble([empty])


def test_chunk_wire_bytes_are_a_standard_kvchunk():
    parts = ChunkParts(4, 1000, [PageSlice(1, 1, 5, 0, 3)], [memoryview(b"ab"), memoryview(b"c")])
    parts.nbytes, parts.crc32 = 3, crc32(b"abc")
    raw = wire.encode_chunk(parts, 5000)
    msg = kvtransfer_pb2.KVChunk.FromString(raw)  # what any protobuf reader sees
    assert (msg.seq, msg.data, msg.crc32, msg.total_bytes, msg.stream_offset) == (
        4, b"abc", zlib.crc32(b"abc"), 5000, 1000,
    )  # fmt: skip
    assert [(s.layer, s.kind, s.block_id, s.length) for s in msg.slices] == [(1, 1, 5, 3)]
    chunk = wire.chunk_from_bytes(raw)
    assert isinstance(chunk.data, memoryview) and bytes(chunk.data) == b"abc"
    assert (chunk.seq, chunk.total_bytes, chunk.stream_offset) == (4, 5000, 1000)
    assert chunk.slices == [PageSlice(1, 1, 5, 0, 3)]
    # any valid encoding (field order, data first or last) reads the same
    other = kvtransfer_pb2.KVChunk(seq=1, data=b"xyz", crc32=7, total_bytes=3).SerializeToString()
    assert bytes(wire.chunk_from_bytes(other).data) == b"xyz"
    assert bytes(wire.chunk_from_bytes(other[::1] + b"\x1a\x01q").data) == b"q"  # last wins


@pytest.mark.parametrize("raw", [b"\x1a\x05ab", b"\x08", b"\x0b\x00", b"\x1a" + b"\xff" * 11])
def test_malformed_chunk_bytes_are_refused(raw):
    with pytest.raises(TransferError, match="malformed"):
        wire.chunk_from_bytes(raw)


@pytest.mark.parametrize("blocks", [[0, 1, 2, 3, 4, 5, 6, 7, 8], [8, 1, 5, 3], [2, 3, 4, 10]])
def test_checksummed_copies_match_gather_and_scatter(blocks):
    layout = make_layout()
    src = PagedKV(make_pool(layout), layout)
    layers = [0, 1, 2]
    expected = src.gather(layers, blocks)
    buf = torch.empty(expected.numel(), dtype=torch.uint8)
    crc = src.copy_out(layers, blocks, memoryview(buf.numpy()))
    assert torch.equal(buf.view(expected.shape), expected)
    assert crc == zlib.crc32(expected.numpy().tobytes())
    dst_t = torch.zeros_like(make_pool(layout))
    dst = PagedKV(dst_t, layout)
    dst_blocks = list(reversed(range(len(blocks))))
    assert dst.copy_in(layers, dst_blocks, memoryview(buf.numpy())) == crc
    assert torch.equal(dst.gather(layers, dst_blocks), expected)
    with pytest.raises(ValueError, match="does not fit"):
        dst.copy_in(layers, dst_blocks, memoryview(buf.numpy())[1:])


def test_gather_and_scatter_by_runs_and_by_index_agree():
    layout = make_layout(num_blocks=40)
    src = PagedKV(make_pool(layout), layout)
    for blocks in ([*range(0, 32)], [5, 9, 1, 30, 2], [*range(10, 20), 3]):
        for layers in ([0, 1, 2], [2, 0], [1]):
            pages = src.gather(layers, blocks)
            ref = torch.stack([torch.stack([src._pages[lay, k, blocks] for k in (0, 1)])
                               for lay in layers])  # fmt: skip
            assert torch.equal(pages, ref)
            dst_t = torch.zeros_like(make_pool(layout))
            PagedKV(dst_t, layout).scatter(layers, blocks, pages)
            assert torch.equal(PagedKV(dst_t, layout).gather(layers, blocks), pages)


def test_shm_segments_are_reused_and_reader_keeps_its_mapping():
    layout = make_layout()
    paged = PagedKV(make_pool(layout), layout)
    exporter, reader = ShmExporter(), ShmReader()
    layers, blocks = [0, 1, 2], [3, 4]
    size = 3 * 2 * 2 * layout.page_bytes
    try:
        names = []
        for _ in range(3):
            info = exporter.export(
                size, lambda out: paged.copy_out(layers, blocks, memoryview(out.numpy())),
                layers, blocks,
            )  # fmt: skip
            assert len(exporter) == 1
            with reader.open(info, size) as view:
                assert torch.equal(view.view(3, 2, 2, -1), paged.gather(layers, blocks))
                reader.verify(info, view)
            exporter.recycle(info.name)
            assert len(exporter) == 0 and exporter.num_free == 1
            names.append(info.name)
        assert len(set(names)) == 1 and exporter.created == 1 and reader.opened == 1
        # a larger transfer takes a new segment; a dropped one is gone for readers too
        big = exporter.export(4 << 20, lambda out: None, layers, blocks)
        assert big.name != names[0] and exporter.created == 2
        exporter.drop(big.name)
        with pytest.raises(TransferError, match="not found"):
            with reader.open(big, 4 << 20):
                pass
        with pytest.raises(TransferError, match="not found"):
            read_segment(big, 4 << 20)
    finally:
        exporter.close()
        reader.close()
    assert not [n for n in os.listdir("/dev/shm") if n in names]


def test_shm_pool_keeps_a_bounded_number_of_free_segments():
    exporter = ShmExporter(max_free_segments=2, max_free_bytes=3 << 20)
    try:
        infos = [exporter.export(n << 20, lambda out: None, [0], [0]) for n in (1, 2, 3)]
        for info in infos:
            exporter.recycle(info.name)
        assert exporter.num_free == 1  # 1 + 2 + 3 MiB > 3 MiB: the largest stays
        assert exporter.export(1 << 20, lambda out: None, [0], [0]).name == infos[2].name
    finally:
        exporter.close()


def test_recycled_segment_overwritten_under_the_reader_fails_its_checksum():
    layout = make_layout()
    paged = PagedKV(make_pool(layout), layout)
    exporter, reader = ShmExporter(), ShmReader()
    size = 3 * 2 * 1 * layout.page_bytes
    try:
        info = exporter.export(
            size, lambda out: paged.copy_out([0, 1, 2], [1], memoryview(out.numpy())), [0, 1, 2],
            [1],
        )  # fmt: skip
        exporter.recycle(info.name)
        exporter.export(size, lambda out: out.fill_(7), [0, 1, 2], [1])  # the same segment
        dst = PagedKV(torch.zeros_like(make_pool(layout)), layout)
        with reader.open(info, size) as view:
            assert dst.copy_in([0, 1, 2], [1], memoryview(view.numpy())) != info.crc32
            with pytest.raises(ChecksumError):
                reader.verify(info, view)
    finally:
        exporter.close()
        reader.close()


@pytest.mark.parametrize(
    "transport,kw",
    [
        ("grpc", {"streams": 1}),
        ("grpc", {"streams": 3, "max_chunk_bytes": 5000}),
        ("shm", {"shm_pieces": 2}),
    ],
)
def test_pull_over_several_streams_or_pieces(transport, kw):
    async def main():
        async with Peer() as peer:
            peer.leases.grant("t1", [5, 6, 7, 2])
            local = pool(LAYOUT, fill=0.0)
            client = peer.client(local, transport=transport, **kw)
            for _ in range(2):  # the second pull reuses segments and mappings
                result = await client.pull("t1", 42, [5, 6, 7, 2], [0, 1, 2, 9])
                assert result.transport == transport
                assert result.num_bytes == 2 * 2 * 4 * LAYOUT.page_bytes
                for src, dst in [(5, 0), (6, 1), (7, 2), (2, 9)]:
                    assert torch.equal(local[:, :, dst], peer.pool[:, :, src])
                local.zero_()
            assert await client.release("t1") is True
            assert peer.shm is None or len(peer.shm) == 0
            await client.close()

    asyncio.run(main())


def test_shm_checksum_failure_falls_back_to_grpc_for_that_pull_only():
    async def main():
        async with Peer() as peer:
            peer.leases.grant("t1", [5, 9])
            export = peer.shm.export

            def corrupting_export(size, fill, layers, blocks):
                info = export(size, fill, layers, blocks)
                return dataclasses.replace(info, crc32=info.crc32 ^ 1)

            peer.shm.export = corrupting_export
            local = pool(LAYOUT, fill=0.0)
            auto = peer.client(local, transport="auto")
            result = await auto.pull("t1", 42, [5, 9], [0, 1])
            assert result.transport == "grpc"
            assert torch.equal(local[:, :, [0, 1]], peer.pool[:, :, [5, 9]])
            peer.shm.export = export
            assert (await auto.pull("t1", 42, [5, 9], [0, 1])).transport == "shm"
            forced = peer.client(local, transport="shm")
            peer.shm.export = corrupting_export
            with pytest.raises(ChecksumError):
                await forced.pull("t1", 42, [5, 9], [0, 1])
            for client in (auto, forced):
                await client.close()

    asyncio.run(main())


def test_transfer_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "kv.json"
    argv = [sys.executable, "-m", "pdserve.bench.kv_transfer", "--tokens", "64", "--layers", "2",
            "--kv-heads", "1", "--head-dim", "8", "--repeats", "2", "--chunk-bytes", "4096",
            "--output-json", str(out)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {
        "memcpy", "memcpy_1thread", "copies", "bare_grpc", "grpc", "shm",
    }  # fmt: skip
    assert report["bytes"] == 2 * 2 * 4 * 16 * 8 * 4
    assert {"shm_vs_memcpy", "grpc_vs_bare_grpc"} <= set(report["ratios"])
    assert "shm_vs_memcpy" in proc.stdout
