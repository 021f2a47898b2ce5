"""The routing benchmark's workload and its ratios (the measured runs need real clusters)."""

from __future__ import annotations

from collections import Counter

from pdserve.bench import routing


class WordTokenizer:
    def encode(self, text: str) -> list[str]:
        return text.split()


def test_workload_shares_each_system_prompt_equally_with_distinct_questions():
    workload = routing.build_workload(WordTokenizer(), 8, 60, 32, seed=1)
    assert Counter(s for s, _ in workload) == {i: 4 for i in range(8)}
    prompts = [p for _, p in workload]
    assert len(set(prompts)) == 32
    systems = {s: p.split("\nQuestion")[0] for s, p in workload}
    assert len(set(systems.values())) == 8
    assert all(len(text.split()) >= 60 for text in systems.values())
    assert routing.build_workload(WordTokenizer(), 8, 60, 32, seed=1) == workload


def test_ratios_compare_against_one_worker_and_round_robin():
    def dep(hit, ttft):
        return {"prefix_hit_rate": hit, "ttft_ms": {"median": ttft, "p90": 2 * ttft}}

    r = routing.ratios({"one-worker": dep(0.8, 100), "round-robin": dep(0.6, 200), "kv-aware": dep(0.76, 100)})  # fmt: skip
    assert abs(r["kv_aware_hit_rate_vs_one_worker"] - 0.95) < 1e-9
    assert abs(r["round_robin_hit_rate_vs_one_worker"] - 0.75) < 1e-9
    assert r["kv_aware_ttft_median_vs_round_robin"] == 0.5
