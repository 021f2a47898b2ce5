"""Same-host transport: page bytes through POSIX shared memory, control over gRPC.

The prefill side copies the requested pages into a fresh segment (order: layer, kind, block, as
in chunking) and names it in its reply; the decode side attaches, verifies size and CRC-32,
copies out and detaches. The segment belongs to the transfer's lease and is unlinked when the
lease is released or expires. Only raw bytes go through the segment; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import uuid
import zlib
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
        self, pages: torch.Tensor, layers: list[int], block_ids: list[int]
    ) -> ShmSegmentInfo:
        """Copy a contiguous uint8 CPU tensor of pages into a new segment."""
        flat = pages.contiguous().view(-1)
        size = flat.numel()
        segment = shared_memory.SharedMemory(
            name=f"{_PREFIX}{uuid.uuid4().hex[:24]}", create=True, size=max(size, 1)
        )
        try:
            view = torch.frombuffer(segment.buf, dtype=torch.uint8, count=size)
            view.copy_(flat)
            del view
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


def read_segment(info: ShmSegmentInfo, expected_size: int, *, verify: bool = True) -> torch.Tensor:
    """Copy a segment's bytes into a new uint8 tensor and verify them.

    The segment is read as the file /dev/shm/<name> rather than attached with SharedMemory:
    attaching would register it with this process's resource tracker, which unlinks "leaked"
    segments at exit -- the exporter owns it. The name comes off the wire, so it must look like
    one of ours (no path tricks).
    """
    if not _SEGMENT_NAME.fullmatch(info.name):
        raise TransferError(f"not a kv segment name: {info.name!r}")
    if info.size != expected_size:
        raise TransferError(f"segment {info.name} has {info.size} bytes, expected {expected_size}")
    out = torch.empty(info.size, dtype=torch.uint8)
    try:
        with open(os.path.join(_SHM_DIR, info.name), "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size < info.size:
                raise TransferError(f"segment {info.name} is smaller than announced")
            _read_exactly(f, memoryview(out.numpy()))
    except FileNotFoundError as exc:
        raise TransferError(f"shared-memory segment {info.name} not found") from exc
    if verify and zlib.crc32(out.numpy()) != info.crc32:
        raise ChecksumError(f"segment {info.name}: CRC-32 mismatch")
    return out


def _read_exactly(f, buf: memoryview) -> None:
    pos = 0
    while pos < len(buf):
        n = f.readinto(buf[pos:])
        if not n:
            raise TransferError("segment ended early")
        pos += n


def _destroy(segment: shared_memory.SharedMemory) -> None:
    try:
        segment.close()
    finally:
        try:
            segment.unlink()
        except FileNotFoundError:
            pass
