"""The content hash of a KV block, the same in every process and on every host.

A block's hash covers its tokens and, through its parent's hash, every token before it, so equal
hashes mean equal prefixes (the engine still compares the tokens on a hit). It is
**pdserve-block-hash-v1**: BLAKE2b with an 8-byte digest over the parent's hash (8 bytes, little
endian; 0 for the first block) followed by the token ids as little-endian uint64, read as a
little-endian unsigned integer. Python's `hash()` would do in one process but not across them
(its seeds differ), and a router must compute the same values as the workers that report them.
Standard library only: the gateway imports it.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

BLOCK_HASH_NAME = "pdserve-block-hash-v1"


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained content hash of one full block."""
    tokens = array("Q", token_ids)
    if sys.byteorder == "big":
        tokens.byteswap()
    digest = hashlib.blake2b(digest_size=8)
    digest.update((parent_hash or 0).to_bytes(8, "little"))
    digest.update(tokens.tobytes())
    return int.from_bytes(digest.digest(), "little")


def hash_blocks(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The hashes of the full blocks of a token sequence, first to last."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
