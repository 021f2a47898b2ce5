"""One cluster of real processes shared by the whole chaos suite (cold starts are the expensive
part on a small CPU machine); tests kill parts of it and `up` restores it before the next one.

    p0  prefill  lease 4 s, every KV chunk delayed 100 ms (wide windows for faults mid-transfer)
    p1  prefill  lease 1 ms, freed blocks overwritten with NaN, no prefix cache (lease expiry)
    d0  decode   3 ms after every engine step (a long stream stays on it for seconds)
    d1  decode   the same
    main     gateway: p0 + d0, d1
    lease    gateway: p1 + d0
    small    gateway: p0 + d1, --max-pending 4 (overload), with its gRPC front door

Set PDSERVE_CHAOS_REPORT=path.json to save the figures the tests record (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from chaos_cluster import (
    DECODE_STEP_DELAY_MS,
    P0_LEASE_MS,
    P0_TRANSFER_DELAY_MS,
    SMALL_MAX_PENDING,
    Cluster,
)

_CLUSTERS: list[Cluster] = []
_HERE = Path(__file__).resolve().parent


def pytest_runtest_teardown(item, nextitem):
    """Stop the cluster after the last chaos test rather than at the end of the whole run, so
    seven idle processes do not share the CPU with the rest of `make test`. (A chaos test that
    runs later anyway finds everything stopped and `up` starts it again.)"""
    if nextitem is None or _HERE not in Path(nextitem.path).resolve().parents:
        for c in _CLUSTERS:
            c.close()


@pytest.fixture(scope="session")
def cluster(tiny_llama, tmp_path_factory):
    c = Cluster(tiny_llama, tmp_path_factory.mktemp("chaos-logs"))
    _CLUSTERS.append(c)
    c.add_worker("p0", "prefill", "--kv-lease-ms", str(P0_LEASE_MS),
                 "--debug-transfer-delay-ms", str(P0_TRANSFER_DELAY_MS))  # fmt: skip
    c.add_worker("p1", "prefill", "--kv-lease-ms", "1", "--debug-fill-freed-kv",
                 "--no-enable-prefix-caching")  # fmt: skip
    c.add_worker("d0", "decode", "--debug-step-delay-ms", str(DECODE_STEP_DELAY_MS))
    c.add_worker("d1", "decode", "--debug-step-delay-ms", str(DECODE_STEP_DELAY_MS))
    c.add_gateway("main", ["p0"], ["d0", "d1"])
    c.add_gateway("lease", ["p1"], ["d0"])
    c.add_gateway("small", ["p0"], ["d1"], "--max-pending", str(SMALL_MAX_PENDING), grpc=True)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture
def up(cluster):
    """Every process running, every gateway seeing its workers, every pool full."""
    cluster.ensure_up()
    cluster.wait_all_free()
    return cluster


_FIGURES: dict[str, dict] = {}


@pytest.fixture(scope="session")
def figures():
    """`figures[test] = {...}`: numbers for docs/reliability.md, saved when asked for."""
    yield _FIGURES
    path = os.environ.get("PDSERVE_CHAOS_REPORT")
    if path:
        Path(path).write_text(json.dumps(_FIGURES, indent=2, sort_keys=True))
