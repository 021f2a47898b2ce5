"""Same-host transport: page bytes through POSIX shared memory, control over gRPC.

The prefill side copies the requested pages into a fresh segment (order: layer, kind, block, as
in chunking) and names it in its reply; the decode side attaches, verifies size and CRC-32,
copies out and detaches. The segment belongs to the transfer's lease and is unlinked when the
lease is released or expires. Only raw bytes go through the segment; nothing is unpickled.
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
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from kvtransfer.chunking import ChecksumError, TransferError

_SHM_DIR = "/dev/shm"
_PREFIX = "pdkv_"
_SEGMENT_NAME = re.compile(_PREFIX + "[0-9a-f]{24}")


@dataclass(frozen=True, slots=True)
class ShmSegmentInfo:
    name: str
    size: int
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
    """Creates segments for transfers and unlinks them on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: dict[str, shared_memory.SharedMemory] = {}

    def export(
        self,
        size: int,
        fill: Callable[[torch.Tensor], object],
        layers: list[int],
        block_ids: list[int],
    ) -> ShmSegmentInfo:
        """Create a segment of `size` bytes and let `fill` write it (a uint8 tensor view)."""
        segment = shared_memory.SharedMemory(
            name=f"{_PREFIX}{uuid.uuid4().hex[:24]}", create=True, size=max(size, 1)
        )
        try:
            view = torch.frombuffer(segment.buf, dtype=torch.uint8, count=size)
            fill(view)
            del view  # the segment cannot close while a tensor exports its buffer
            crc = zlib.crc32(segment.buf[:size])
        except BaseException:
            _destroy(segment)
            raise
        with self._lock:
            self._segments[segment.name] = segment
        return ShmSegmentInfo(segment.name, size, tuple(layers), tuple(block_ids), crc)

    def drop(self, name: str) -> None:
        with self._lock:
            segment = self._segments.pop(name, None)
        if segment is not None:
            _destroy(segment)

    def close(self) -> None:
        with self._lock:
            segments, self._segments = list(self._segments.values()), {}
        for segment in segments:
            _destroy(segment)

    def __len__(self) -> int:
        with self._lock:
            return len(self._segments)


@contextlib.contextmanager
def open_segment(
    info: ShmSegmentInfo, expected_size: int, *, verify: bool = True
) -> Iterator[torch.Tensor]:
    """Map a segment and yield its bytes as a uint8 tensor (verified), valid inside the block.

    The segment is mapped from the file /dev/shm/<name> rather than attached with SharedMemory:
    attaching would register it with this process's resource tracker, which unlinks "leaked"
    segments at exit -- the exporter owns it. The mapping is private (copy-on-write), so nothing
    here can change the exporter's bytes. The name comes off the wire, so it must look like one
    of ours (no path tricks). Drop every view of the tensor before the block ends.
    """
    if not _SEGMENT_NAME.fullmatch(info.name):
        raise TransferError(f"not a kv segment name: {info.name!r}")
    if info.size != expected_size or info.size == 0:
        raise TransferError(f"segment {info.name} has {info.size} bytes, expected {expected_size}")
    try:
        fd = os.open(os.path.join(_SHM_DIR, info.name), os.O_RDONLY)
    except FileNotFoundError as exc:
        raise TransferError(f"shared-memory segment {info.name} not found") from exc
    try:
        if os.fstat(fd).st_size < info.size:
            raise TransferError(f"segment {info.name} is smaller than announced")
        mapping = mmap.mmap(fd, info.size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    try:
        view = torch.frombuffer(mapping, dtype=torch.uint8, count=info.size)
        if verify and zlib.crc32(mapping) != info.crc32:
            raise ChecksumError(f"segment {info.name}: CRC-32 mismatch")
        yield view
    finally:
        view = None  # release the export before closing the mapping
        mapping.close()


def read_segment(info: ShmSegmentInfo, expected_size: int, *, verify: bool = True) -> torch.Tensor:
    """A verified copy of a segment's bytes."""
    with open_segment(info, expected_size, verify=verify) as view:
        return view.clone()


def _destroy(segment: shared_memory.SharedMemory) -> None:
    try:
        segment.close()
    finally:
        try:
            segment.unlink()
        except FileNotFoundError:
            pass
