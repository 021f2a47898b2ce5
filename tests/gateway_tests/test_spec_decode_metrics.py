"""Decode workers' speculative-decoding counters reach /metrics under vLLM's names."""

from __future__ import annotations

from types import SimpleNamespace

from gateway.metrics import _WorkerCollector
from gateway.worker_client import LoadSnapshot
from protos.pdserve.v1 import common_pb2


def test_spec_decode_counters_and_rates_are_exported():
    from gateway.worker_client import _load_snapshot

    report = common_pb2.LoadReport(
        role="decode",
        spec_decode_num_drafts=10,
        spec_decode_num_draft_tokens=40,
        spec_decode_num_accepted_tokens=30,
        spec_decode_num_emitted_tokens=38,
        spec_decode_num_accepted_tokens_per_pos=[9, 8, 7, 6],
    )
    load = _load_snapshot(report)
    assert isinstance(load, LoadSnapshot)
    worker = SimpleNamespace(role="decode", address="127.0.0.1:1", healthy=True, load=load)
    families = {
        f.name: f
        for f in _WorkerCollector(
            SimpleNamespace(workers=[worker], index=SimpleNamespace(hashes=lambda a: set())),
            "tiny",
        ).collect()
    }

    def value(name: str) -> float:
        return families[name].samples[0].value

    assert value("pdserve:spec_decode_num_drafts") == 10
    assert value("pdserve:spec_decode_num_draft_tokens") == 40
    assert value("pdserve:spec_decode_num_accepted_tokens") == 30
    assert value("pdserve:spec_decode_num_emitted_tokens") == 38
    assert value("pdserve:spec_decode_draft_acceptance_rate") == 0.75
    assert value("pdserve:spec_decode_mean_acceptance_length") == 4.0
    assert families["pdserve:spec_decode_num_drafts"].samples[0].labels["role"] == "decode"
    per_pos = families["pdserve:spec_decode_num_accepted_tokens_per_pos"].samples
    assert [(s.labels["position"], s.value) for s in per_pos] == [
        ("0", 9), ("1", 8), ("2", 7), ("3", 6)
    ]  # fmt: skip
