"""kvtransfer bookkeeping without a model: layout, pages, chunking, leases, shared memory."""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib

import pytest
import torch

from kvtransfer.chunking import (
    MAX_CHUNK_BYTES,
    ChecksumError,
    ChunkAssembler,
    PageSlice,
    TransferError,
    clamp_chunk_bytes,
    iter_chunks,
)
from kvtransfer.layout import IncompatibleLayoutError, KVLayout, check_compatible
from kvtransfer.lease import (
    ExpiredLeaseError,
    FreeReason,
    LeaseConfig,
    LeaseTable,
    UnknownLeaseError,
)
from kvtransfer.pages import KVAddressError, PagedKV
from kvtransfer.shm import ShmExporter, ShmSegmentInfo, read_segment


def make_layout(**changes) -> KVLayout:
    base = dict(
        model_fingerprint="abc123",
        dtype="float32",
        num_layers=3,
        num_kv_heads=2,
        head_dim=8,
        block_size=4,
        num_blocks=10,
    )
    base.update(changes)
    return KVLayout(**base)


def make_pool(layout: KVLayout, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (
        layout.num_layers,
        2,
        layout.num_blocks,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
    )
    return torch.randn(shape, generator=gen).to(getattr(torch, layout.dtype))


# -- layout and handshake -------------------------------------------------------------------


def test_page_bytes_and_hash_ignore_pool_size():
    a, b = make_layout(), make_layout(num_blocks=99)
    assert a.page_bytes == 4 * 2 * 8 * 4
    assert a.compat_hash() == b.compat_hash()
    check_compatible(a, b, b.compat_hash())


@pytest.mark.parametrize(
    "field,value",
    [
        ("model_fingerprint", "other"),
        ("dtype", "bfloat16"),
        ("num_layers", 4),
        ("num_kv_heads", 1),
        ("head_dim", 16),
        ("block_size", 8),
        ("layout_version", 2),
    ],
)
def test_any_compat_field_mismatch_is_refused_by_name(field, value):
    local = make_layout()
    remote = dataclasses.replace(local, **{field: value})
    assert local.compat_hash() != remote.compat_hash()
    with pytest.raises(IncompatibleLayoutError, match=field):
        check_compatible(local, remote, remote.compat_hash())


def test_hash_that_does_not_match_its_layout_is_refused():
    layout = make_layout()
    with pytest.raises(IncompatibleLayoutError, match="does not match its own layout"):
        check_compatible(layout, layout, "0" * 32)


def test_layout_validates_fields():
    with pytest.raises(ValueError, match="dtype"):
        make_layout(dtype="int7")
    with pytest.raises(ValueError, match="num_layers"):
        make_layout(num_layers=0)


# -- pages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gather_scatter_round_trip_moves_exact_bytes(dtype):
    layout = make_layout(dtype=dtype)
    src_pool, dst_pool = make_pool(layout, 1), torch.zeros_like(make_pool(layout))
    src, dst = PagedKV(src_pool, layout), PagedKV(dst_pool, layout)
    pages = src.gather([0, 1, 2], [7, 2])
    assert pages.shape == (3, 2, 2, layout.page_bytes)
    dst.scatter([0, 1, 2], [0, 5], pages)
    assert torch.equal(dst_pool[:, :, 0], src_pool[:, :, 7])
    assert torch.equal(dst_pool[:, :, 5], src_pool[:, :, 2])
    untouched = [b for b in range(layout.num_blocks) if b not in (0, 5)]
    assert not dst_pool[:, :, untouched].any()


def test_gather_into_a_buffer_matches_gather():
    layout = make_layout()
    paged = PagedKV(make_pool(layout), layout)
    for layers in ([0, 1, 2], [2, 0]):
        out = torch.empty(len(layers) * 2 * 2 * layout.page_bytes, dtype=torch.uint8)
        paged.gather(layers, [5, 1], out)
        assert torch.equal(out.view(len(layers), 2, 2, -1), paged.gather(layers, [5, 1]))
    with pytest.raises(ValueError, match="bytes"):
        paged.gather([0], [1], torch.empty(3, dtype=torch.uint8))


def test_gather_of_some_layers_only():
    layout = make_layout()
    pool = make_pool(layout)
    pages = PagedKV(pool, layout).gather([2], [3])
    assert torch.equal(pages[0, 1, 0].view(torch.float32).view(4, 2, 8), pool[2, 1, 3])


def test_pages_validate_addresses():
    layout = make_layout()
    paged = PagedKV(make_pool(layout), layout)
    with pytest.raises(KVAddressError, match="out of range"):
        paged.gather([0], [10])
    with pytest.raises(KVAddressError, match="duplicates"):
        paged.gather([0], [1, 1])
    with pytest.raises(KVAddressError, match="layers out of range"):
        paged.gather([3], [1])
    with pytest.raises(KVAddressError, match="empty"):
        paged.gather([0], [])


def test_paged_kv_refuses_a_pool_of_another_shape():
    layout = make_layout()
    with pytest.raises(ValueError, match="shape"):
        PagedKV(make_pool(make_layout(num_blocks=4)), layout)


def test_fill_overwrites_only_the_given_blocks():
    layout = make_layout()
    pool = make_pool(layout)
    before = pool.clone()
    PagedKV(pool, layout).fill([4], 0xFF)
    assert torch.isnan(pool[:, :, 4]).all()  # 0xFFFFFFFF is a NaN in float32
    assert torch.equal(pool[:, :, 3], before[:, :, 3])


# -- chunking ---------------------------------------------------------------------------------


def chunks_of(pool, layout, layers, blocks, max_chunk):
    paged = PagedKV(pool, layout)

    def read_layer(layer):
        return memoryview(paged.gather([layer], blocks).numpy()).cast("B")

    return list(iter_chunks(layers, blocks, layout.page_bytes, read_layer, max_chunk))


@pytest.mark.parametrize("max_chunk", [100, 256, 1000, 4096, 0])
def test_chunks_are_bounded_and_reassemble_exactly(max_chunk):
    layout = make_layout()  # page_bytes = 256
    pool = make_pool(layout)
    layers, blocks = [0, 1, 2], [9, 0, 4]
    chunks = chunks_of(pool, layout, layers, blocks, max_chunk)
    budget = clamp_chunk_bytes(max_chunk)
    assert all(len(c.data) <= budget for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assembler = ChunkAssembler(layers, blocks, layout.page_bytes)
    for chunk in chunks:
        assembler.add(chunk)
    expected = PagedKV(pool, layout).gather(layers, blocks)
    assert torch.equal(assembler.finish(), expected)


def test_chunk_size_is_capped_at_one_mib():
    assert clamp_chunk_bytes(64 << 20) == MAX_CHUNK_BYTES
    assert clamp_chunk_bytes(0) == MAX_CHUNK_BYTES
    with pytest.raises(ValueError):
        clamp_chunk_bytes(-1)


def _assembled(layout, chunks, layers=(0, 1, 2), blocks=(1, 2)):
    assembler = ChunkAssembler(list(layers), list(blocks), layout.page_bytes)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


def test_corrupted_chunk_fails_its_checksum():
    layout = make_layout()
    chunks = chunks_of(make_pool(layout), layout, [0, 1, 2], [1, 2], 500)
    data = bytearray(chunks[1].data)
    data[7] ^= 0x01
    chunks[1].data = bytes(data)
    with pytest.raises(ChecksumError):
        _assembled(layout, chunks)


def test_missing_chunk_is_detected():
    layout = make_layout()
    chunks = chunks_of(make_pool(layout), layout, [0, 1, 2], [1, 2], 500)
    with pytest.raises(TransferError, match="seq"):
        _assembled(layout, chunks[:1] + chunks[2:])
    with pytest.raises(TransferError, match="incomplete"):
        _assembled(layout, chunks[:-1])


def test_slice_for_an_unrequested_block_is_refused():
    layout = make_layout()
    chunks = chunks_of(make_pool(layout), layout, [0, 1, 2], [1, 2], 500)
    first = chunks[0].slices[0]
    chunks[0].slices[0] = dataclasses.replace(first, block_id=7)
    with pytest.raises(TransferError, match="not requested"):
        _assembled(layout, chunks)


def test_overlapping_or_oversized_slices_are_refused():
    layout = make_layout()
    chunks = chunks_of(make_pool(layout), layout, [0, 1, 2], [1, 2], 500)
    # Re-declare the first chunk as two slices covering the same page bytes twice.
    c = chunks[0]
    half = PageSlice(0, 0, 1, 0, 128)
    c.slices = [half, half] + c.slices[1:]
    c.data = c.data[:128] + c.data[:128] + c.data[256:]
    c.crc32 = zlib.crc32(c.data)
    with pytest.raises(TransferError, match="offset"):
        _assembled(layout, chunks)


def test_wrong_total_is_refused():
    layout = make_layout()
    chunks = chunks_of(make_pool(layout), layout, [0, 1, 2], [1, 2], 500)
    with pytest.raises(TransferError, match="announces"):
        _assembled(layout, chunks, blocks=(1, 2, 3))


# -- leases -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_table(**config):
    freed: list[tuple[str, FreeReason]] = []
    clock = FakeClock()
    table = LeaseTable(
        lambda lease, reason: freed.append((lease.transfer_id, reason)),
        LeaseConfig(default_ms=1000, max_ms=5000, **config),
        clock,
    )
    return table, freed, clock


def test_release_frees_once():
    table, freed, _ = make_table()
    table.grant("t1", [1, 2])
    assert table.release("t1") is True
    assert table.release("t1") is False
    assert freed == [("t1", FreeReason.RELEASED)]
    assert len(table) == 0


def test_duplicate_grant_is_refused():
    table, _, _ = make_table()
    table.grant("t1", [1])
    with pytest.raises(ValueError, match="already"):
        table.grant("t1", [2])


def test_expiry_frees_and_later_reads_fail_loudly():
    table, freed, clock = make_table()
    table.grant("t1", [1, 2])
    clock.now += 0.999
    assert table.reap() == []
    clock.now += 0.002
    assert table.reap() == ["t1"]
    assert freed == [("t1", FreeReason.EXPIRED)]
    with pytest.raises(ExpiredLeaseError):
        with table.pinned("t1"):
            pass
    with pytest.raises(ExpiredLeaseError):
        table.extend("t1", 1000)
    assert table.release("t1") is False


def test_past_deadline_is_expired_even_before_the_reaper_runs():
    table, freed, clock = make_table()
    table.grant("t1", [1])
    clock.now += 2
    with pytest.raises(ExpiredLeaseError):
        with table.pinned("t1"):
            pass
    assert freed == []  # the reaper frees it, once
    table.reap()
    assert freed == [("t1", FreeReason.EXPIRED)]


def test_extend_pushes_expiry_and_is_capped():
    table, _, clock = make_table()
    table.grant("t1", [1])
    clock.now += 0.9
    assert table.extend("t1", 10_000) == 5000  # capped at max_ms
    clock.now += 4.0
    assert table.reap() == []
    clock.now += 1.1
    assert table.reap() == ["t1"]


def test_pinned_lease_is_not_freed_under_the_reader():
    table, freed, clock = make_table()
    table.grant("t1", [1])
    with table.pinned("t1"):
        clock.now += 10
        assert table.reap() == []
        assert table.release("t1") is True
        assert freed == []  # deferred
    assert freed == [("t1", FreeReason.RELEASED)]
    with pytest.raises(UnknownLeaseError, match="released"):
        table.get("t1")


def test_unknown_lease_error_names_the_transfer():
    table, _, _ = make_table()
    with pytest.raises(UnknownLeaseError, match="nope"):
        table.extend("nope", 10)


def test_close_frees_every_lease():
    table, freed, _ = make_table()
    table.grant("a", [1])
    table.grant("b", [2])
    table.close()
    assert sorted(freed) == [("a", FreeReason.SHUTDOWN), ("b", FreeReason.SHUTDOWN)]


def test_background_reaper_expires_leases():
    done = threading.Event()
    table = LeaseTable(
        lambda lease, reason: done.set(), LeaseConfig(default_ms=30, reap_interval_s=0.01)
    )
    table.start_reaper()
    try:
        table.grant("t1", [1])
        assert done.wait(2.0)
        assert len(table) == 0
    finally:
        table.close()


def test_on_free_exception_does_not_break_the_table():
    def boom(lease, reason):
        raise RuntimeError("boom")

    table = LeaseTable(boom, LeaseConfig())
    table.grant("t1", [1])
    assert table.release("t1") is True
    assert len(table) == 0


def test_concurrent_release_and_reap_free_once():
    freed = []
    clock = FakeClock()
    table = LeaseTable(lambda lease, r: freed.append(lease.transfer_id), LeaseConfig(), clock)
    for i in range(200):
        table.grant(f"t{i}", [i])
    clock.now += 100
    threads = [threading.Thread(target=table.reap)] + [
        threading.Thread(target=lambda: [table.release(f"t{i}") for i in range(200)])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(freed) == sorted(f"t{i}" for i in range(200))


# -- shared memory ----------------------------------------------------------------------------


def test_shm_round_trip_and_unlink():
    layout = make_layout()
    pages = PagedKV(make_pool(layout), layout).gather([0, 1, 2], [3, 4])
    exporter = ShmExporter()
    info = exporter.export(pages.numel(), lambda out: out.copy_(pages.view(-1)), [0, 1, 2], [3, 4])
    try:
        out = read_segment(info, pages.numel())
        assert torch.equal(out, pages.view(-1))
        with pytest.raises(TransferError, match="expected"):
            read_segment(info, pages.numel() + 1)
        bad = dataclasses.replace(info, crc32=info.crc32 ^ 1)
        with pytest.raises(ChecksumError):
            read_segment(bad, pages.numel())
    finally:
        exporter.drop(info.name)
    assert len(exporter) == 0
    with pytest.raises(TransferError, match="not found"):
        read_segment(info, pages.numel())


def test_shm_segment_name_from_the_wire_is_validated():
    info = ShmSegmentInfo("../etc/passwd", 10, (0,), (1,), 0)
    with pytest.raises(TransferError, match="not a kv segment"):
        read_segment(info, 10)


def test_lease_timing_uses_monotonic_clock_by_default():
    table = LeaseTable(lambda lease, r: None, LeaseConfig(default_ms=50))
    table.grant("t", [1])
    time.sleep(0.08)
    assert table.reap() == ["t"]
