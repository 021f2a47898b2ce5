"""The block hash is the same in every process: a router can compute what workers report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from contract.block_hash import BLOCK_HASH_NAME, hash_block, hash_blocks
from engine.block_pool import hash_block as engine_hash_block

REPO = Path(__file__).resolve().parents[2]
# Changing these values is a new hash (a new BLOCK_HASH_NAME): routers and workers must agree.
PINNED_FIRST = 15419130808853295947
PINNED_SECOND = 13931401434043050494


def test_the_engine_uses_the_contract_hash():
    assert engine_hash_block is hash_block
    assert BLOCK_HASH_NAME == "pdserve-block-hash-v1"


def test_pinned_values_never_change():
    first = hash_block(None, range(16))
    assert first == PINNED_FIRST
    assert hash_block(first, range(16, 32)) == PINNED_SECOND
    assert hash_blocks(list(range(40)), 16) == [PINNED_FIRST, PINNED_SECOND]


def test_equal_in_another_process_with_another_hash_seed():
    code = "from contract.block_hash import hash_block; print(hash_block(None, range(16)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert int(out.stdout) == PINNED_FIRST


def test_the_parent_and_every_token_count():
    tokens = list(range(16))
    base = hash_block(None, tokens)
    assert hash_block(base, tokens) != base
    assert hash_block(None, [*tokens[:-1], 99]) != base
