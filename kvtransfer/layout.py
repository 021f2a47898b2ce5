"""The KV page layout and its compatibility hash.

A *page* is the bytes of one (layer, kind, block) of an engine's KV pool
    kv_cache: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
i.e. kv_cache[layer, kind, block], kind 0 = K, 1 = V: block_size * num_kv_heads * head_dim
elements of `dtype`, contiguous, row-major. Two workers can exchange pages only when every field
that shapes a page (and the weights that produced it) is equal: that is the compatibility hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from contract.errors import ErrorKind

LAYOUT_VERSION = 1  # bump when the meaning of a page's bytes changes

DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

# Fields that must match between two workers (num_blocks may differ: pools differ in size).
COMPAT_FIELDS = (
    "layout_version",
    "model_fingerprint",
    "dtype",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "block_size",
)

K, V = 0, 1
KINDS = (K, V)


@dataclass(frozen=True, slots=True)
class KVLayout:
    model_fingerprint: str
    dtype: str  # torch dtype name without the "torch." prefix
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    layout_version: int = LAYOUT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; known: {sorted(DTYPE_BYTES)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.model_fingerprint:
            raise ValueError("model_fingerprint must be non-empty")

    @property
    def page_bytes(self) -> int:
        """Bytes of one (layer, kind, block)."""
        return self.block_size * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    def compat_hash(self) -> str:
        text = "|".join(f"{name}={getattr(self, name)}" for name in COMPAT_FIELDS)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def mismatches(self, other: KVLayout) -> list[str]:
        """Human-readable differences in the fields that must match."""
        return [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in COMPAT_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]

    @classmethod
    def from_spec(cls, spec: object, model_fingerprint: str) -> KVLayout:
        """From an engine `KVCacheSpec` (num_layers, num_kv_heads, head_dim, block_size,
        num_blocks, dtype)."""
        return cls(
            model_fingerprint=model_fingerprint,
            dtype=dtype_name(spec.dtype),  # type: ignore[attr-defined]
            num_layers=int(spec.num_layers),  # type: ignore[attr-defined]
            num_kv_heads=int(spec.num_kv_heads),  # type: ignore[attr-defined]
            head_dim=int(spec.head_dim),  # type: ignore[attr-defined]
            block_size=int(spec.block_size),  # type: ignore[attr-defined]
            num_blocks=int(spec.num_blocks),  # type: ignore[attr-defined]
        )


def dtype_name(dtype: object) -> str:
    """torch.bfloat16 / "torch.bfloat16" / "bfloat16" -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


class IncompatibleLayoutError(ValueError):
    """Two workers' KV layouts differ: their pages cannot be exchanged."""

    kind = ErrorKind.PRECONDITION


def check_compatible(local: KVLayout, remote: KVLayout, remote_hash: str) -> None:
    """Raise IncompatibleLayoutError unless `remote` (claiming `remote_hash`) matches `local`."""
    if remote.compat_hash() != remote_hash:
        raise IncompatibleLayoutError(
            f"peer's compatibility hash {remote_hash!r} does not match its own layout "
            f"({remote.compat_hash()!r})"
        )
    diffs = local.mismatches(remote)
    if diffs:
        raise IncompatibleLayoutError("incompatible KV layouts: " + "; ".join(diffs))


def transfer_bytes(num_layers: int, num_blocks: int, page_bytes: int) -> int:
    return num_layers * len(KINDS) * num_blocks * page_bytes


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(first block id, count) for each run of consecutive ids, in order: [4, 5, 6, 9] ->
    [(4, 3), (9, 1)]. Consecutive blocks are adjacent in a pool, so a run is one byte range."""
    runs: list[tuple[int, int]] = []
    for block in block_ids:
        if runs and block == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs
