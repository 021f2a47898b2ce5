"""CRC-32 of transfer bytes (zlib's polynomial: the values equal `zlib.crc32`).

zlib-ng's CRC-32 uses carry-less multiplication (PCLMULQDQ/VPCLMULQDQ) and runs at 10-20 GB/s on
current x86 CPUs, about ten times zlib's table-driven one; without it (not installed, or an
unusual platform) the standard library's `zlib.crc32` gives the same numbers, slower. Both take
any contiguous buffer (bytes, memoryview, mmap) and release the GIL on large inputs.
"""

from __future__ import annotations

try:
    from zlib_ng.zlib_ng import crc32 as _crc32

    IMPLEMENTATION = "zlib-ng"
except ImportError:  # pragma: no cover - depends on the installed packages
    from zlib import crc32 as _crc32

    IMPLEMENTATION = "zlib"


def crc32(data, value: int = 0) -> int:
    """CRC-32 of `data`, continuing from `value` (the CRC-32 of the bytes before it)."""
    return _crc32(data, value)
