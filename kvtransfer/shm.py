"""Same-host transport: page bytes through POSIX shared memory, control over gRPC.

The prefill side gathers the requested pages into a segment (order: layer, kind, block, as in
chunking) with one copy, and names it in its reply with the CRC-32 of the bytes; the decode side
copies them from its mapping of the segment straight into its pool, then verifies the CRC-32 of
the segment (after the copy, so a segment overwritten during the copy is caught). Only raw bytes
go through the segment; nothing is unpickled.

Segments are reused, because a fresh one costs a page fault per 4 KiB on both sides (for a
100 MB transfer, more than the copy itself). The prefill side keeps a pool: a transfer takes the
smallest free segment that is large enough (or creates one), the segment belongs to the transfer's
lease, and goes back to the pool when the lease is released by the reader (which has finished
copying by then). A lease that expires or is shut down unlinks its segment instead: a late reader
keeps its own mapping of the old bytes, never sees the next transfer's. The decode side keeps its
mappings of a peer's segments (`ShmReader`), so a reused segment is neither reopened nor faulted in
again.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from kvtransfer.checksum import crc32
from kvtransfer.chunking import ChecksumError, TransferError

_SHM_DIR = "/dev/shm"
_PREFIX = "pdkv_"
_SEGMENT_NAME = re.compile(_PREFIX + "[0-9a-f]{24}")
_GRANULE = 1 << 20  # segment sizes are rounded up to this
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


@dataclass(frozen=True, slots=True)
class ShmSegmentInfo:
    name: str
    size: int  # bytes of this transfer, at the start of the segment
    layers: tuple[int, ...]
    block_ids: tuple[int, ...]
    crc32: int


def host_id() -> str:
    """Identifies this host (and its shared-memory namespace) well enough to pick shm."""
    boot_id = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        pass
    return hashlib.sha256(f"{socket.gethostname()}|{boot_id}".encode()).hexdigest()[:16]


def shm_available() -> bool:
    return os.path.isdir(_SHM_DIR) and os.access(_SHM_DIR, os.W_OK)


class ShmExporter:
    """Hands out segments for transfers from a pool, and takes them back.

    `len()` counts the segments in use (tied to a lease); up to `max_free_segments` free ones,
    `max_free_bytes` in all (the largest is always kept), wait for the next transfer.
    """

    def __init__(self, *, max_free_segments: int = 4, max_free_bytes: int = 1 << 30) -> None:
        self._lock = threading.Lock()
        self._in_use: dict[str, shared_memory.SharedMemory] = {}
        self._free: list[shared_memory.SharedMemory] = []  # sorted by size
        self.max_free_segments = max_free_segments
        self.max_free_bytes = max_free_bytes
        self.created = 0  # segments created so far (reuse shows as few)

    def export(
        self,
        size: int,
        fill: Callable[[torch.Tensor], object],  # returns the CRC-32 or anything else
        layers: list[int],
        block_ids: list[int],
    ) -> ShmSegmentInfo:
        """Take a segment of at least `size` bytes, let `fill` write its first `size` bytes
        (a uint8 tensor view), and mark it in use (until `recycle` or `drop`). When `fill`
        returns an int, that is the CRC-32 of what it wrote; otherwise it is computed here."""
        segment = self._take(size)
        try:
            view = torch.frombuffer(segment.buf, dtype=torch.uint8, count=size)
            crc = fill(view)
            del view  # the segment cannot close while a tensor exports its buffer
            if not isinstance(crc, int):
                crc = crc32(segment.buf[:size])
        except BaseException:
            _destroy(segment)
            raise
        with self._lock:
            self._in_use[segment.name] = segment
        return ShmSegmentInfo(segment.name, size, tuple(layers), tuple(block_ids), crc)

    def recycle(self, name: str) -> None:
        """A segment whose reader is done with it: back to the pool."""
        with self._lock:
            segment = self._in_use.pop(name, None)
            if segment is None:
                return
            self._free.append(segment)
            self._free.sort(key=lambda s: s.size)
            excess = self._trim()
        for old in excess:
            _destroy(old)

    def drop(self, name: str) -> None:
        """Unlink a segment in use (a reader may still hold a mapping: it keeps the bytes)."""
        with self._lock:
            segment = self._in_use.pop(name, None)
        if segment is not None:
            _destroy(segment)

    def close(self) -> None:
        with self._lock:
            segments = list(self._in_use.values()) + self._free
            self._in_use, self._free = {}, []
        for segment in segments:
            _destroy(segment)

    def __len__(self) -> int:
        with self._lock:
            return len(self._in_use)

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    def _take(self, size: int) -> shared_memory.SharedMemory:
        with self._lock:
            for i, segment in enumerate(self._free):
                if segment.size >= size:
                    return self._free.pop(i)
            self.created += 1
        capacity = -(-max(size, 1) // _GRANULE) * _GRANULE
        return shared_memory.SharedMemory(
            name=f"{_PREFIX}{uuid.uuid4().hex[:24]}", create=True, size=capacity
        )

    def _trim(self) -> list[shared_memory.SharedMemory]:
        """Free segments beyond the limits, smallest first (call with the lock held)."""
        excess = []
        while len(self._free) > 1 and (
            len(self._free) > self.max_free_segments
            or sum(s.size for s in self._free) > self.max_free_bytes
        ):
            excess.append(self._free.pop(0))
        return excess


class ShmReader:
    """The decode side's mappings of one peer's segments, kept for reuse (at most `max_cached`
    unused ones). Thread-safe; a mapping is never closed while a copy reads it."""

    def __init__(self, max_cached: int = 8) -> None:
        self._lock = threading.Lock()
        self._maps: OrderedDict[str, _Mapping] = OrderedDict()
        self.max_cached = max_cached
        self.opened = 0  # mappings created so far (reuse shows as few)

    @contextlib.contextmanager
    def open(self, info: ShmSegmentInfo, expected_size: int) -> Iterator[torch.Tensor]:
        """The segment's first `info.size` bytes as a uint8 tensor, valid inside the block; drop
        every view of it before the block ends. Not verified: call `verify` after copying."""
        _check_info(info, expected_size)
        path = os.path.join(_SHM_DIR, info.name)
        try:
            st = os.stat(path)
        except FileNotFoundError as exc:
            self._forget(info.name)
            raise TransferError(f"shared-memory segment {info.name} not found") from exc
        if st.st_size < info.size:
            raise TransferError(f"segment {info.name} is smaller than announced")
        with self._lock:
            m = self._maps.get(info.name)
            if m is not None and (m.ino, m.size) != (st.st_ino, st.st_size):
                m = None  # not the file we mapped: map it afresh
            if m is not None:
                self._maps.move_to_end(info.name)
                m.users += 1
        if m is None:
            m = _Mapping(_map_file(path, info.name), st.st_ino, st.st_size)
            m.users = 1
            with self._lock:
                self.opened += 1
                old = self._maps.get(info.name)
                self._maps[info.name] = m
                stale = [old] if old is not None and old.users == 0 else []
                stale += self._evict()
            for s in stale:
                s.mapping.close()
        try:
            view = torch.frombuffer(m.mapping, dtype=torch.uint8, count=info.size)
            yield view
        finally:
            view = None  # release the export before the mapping may close
            with self._lock:
                m.users -= 1
                if self._maps.get(info.name) is not m and m.users == 0:
                    m.mapping.close()
            self._sweep()

    @staticmethod
    def verify(info: ShmSegmentInfo, view: torch.Tensor) -> None:
        if crc32(memoryview(view.numpy())) != info.crc32:
            raise ChecksumError(f"segment {info.name}: CRC-32 mismatch")

    def close(self) -> None:
        with self._lock:
            maps, self._maps = list(self._maps.values()), OrderedDict()
        for m in maps:
            if m.users == 0:
                m.mapping.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)

    def _forget(self, name: str) -> None:
        with self._lock:
            m = self._maps.pop(name, None)
        if m is not None and m.users == 0:
            m.mapping.close()

    def _sweep(self) -> None:
        """Unmap segments the peer has unlinked (their memory lives as long as our mapping)."""
        with self._lock:
            names = list(self._maps)
        for name in names:
            if not os.path.exists(os.path.join(_SHM_DIR, name)):
                self._forget(name)

    def _evict(self) -> list[_Mapping]:
        """Unused mappings beyond max_cached, oldest first (call with the lock held)."""
        out = []
        for name in list(self._maps):
            if len(self._maps) <= self.max_cached:
                break
            if self._maps[name].users == 0:
                out.append(self._maps.pop(name))
        return out


@dataclass(slots=True)
class _Mapping:
    mapping: mmap.mmap
    ino: int
    size: int
    users: int = 0


@contextlib.contextmanager
def open_segment(
    info: ShmSegmentInfo, expected_size: int, *, verify: bool = True
) -> Iterator[torch.Tensor]:
    """Map a segment once and yield its bytes as a uint8 tensor (verified), valid inside the
    block. Drop every view of the tensor before the block ends. (`ShmReader` keeps mappings.)"""
    _check_info(info, expected_size)
    mapping = _map_file(os.path.join(_SHM_DIR, info.name), info.name, size=info.size)
    try:
        view = torch.frombuffer(mapping, dtype=torch.uint8, count=info.size)
        if verify and crc32(mapping) != info.crc32:
            raise ChecksumError(f"segment {info.name}: CRC-32 mismatch")
        yield view
    finally:
        view = None  # release the export before closing the mapping
        mapping.close()


def read_segment(info: ShmSegmentInfo, expected_size: int, *, verify: bool = True) -> torch.Tensor:
    """A verified copy of a segment's bytes."""
    with open_segment(info, expected_size, verify=verify) as view:
        return view.clone()


def _check_info(info: ShmSegmentInfo, expected_size: int) -> None:
    # The name comes off the wire, so it must look like one of ours (no path tricks).
    if not _SEGMENT_NAME.fullmatch(info.name):
        raise TransferError(f"not a kv segment name: {info.name!r}")
    if info.size != expected_size or info.size == 0:
        raise TransferError(f"segment {info.name} has {info.size} bytes, expected {expected_size}")


def _map_file(path: str, name: str, size: int = 0) -> mmap.mmap:
    """Map /dev/shm/<name> privately (copy-on-write: nothing here can change the exporter's
    bytes) and fault its pages in with one call.

    Mapped from the file rather than attached with SharedMemory: attaching would register the
    segment with this process's resource tracker, which unlinks "leaked" segments at exit -- the
    exporter owns it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise TransferError(f"shared-memory segment {name} not found") from exc
    try:
        file_size = os.fstat(fd).st_size
        if file_size < size:
            raise TransferError(f"segment {name} is smaller than announced")
        mapping = mmap.mmap(fd, size or file_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError, ValueError):
        mapping.madvise(_MADV_POPULATE_READ)  # read faults only: no copy-on-write copies
    return mapping


def _destroy(segment: shared_memory.SharedMemory) -> None:
    try:
        segment.close()
    finally:
        try:
            segment.unlink()
        except FileNotFoundError:
            pass
