"""The prefill:decode sizing arithmetic, on hand-made profiles."""

from __future__ import annotations

import json

import pytest

from pdserve.bench import sizing

ROUTING = {
    "workload": {"mean_prompt_tokens": 500.0},
    "prefill_profile": {"prefill_tok_s_per_worker": 1000.0},
    "deployments": {"kv-aware": {"prefix_hit_rate": 0.8}},
}
DECODE = {"results": [{"batch": 1, "engine_step_ms": 20.0}, {"batch": 33, "engine_step_ms": 84.0}]}


def test_step_time_is_linear_between_and_beyond_profiled_batches():
    curve = sizing.step_ms_curve(DECODE)
    assert sizing.step_ms(curve, 17) == pytest.approx(52.0)
    assert sizing.step_ms(curve, 65) == pytest.approx(148.0)
    assert sizing.max_batch(curve, 52.0) == 17


def test_workers_follow_the_queueing_and_littles_law_arithmetic():
    prefill = sizing.prefill_from_routing(ROUTING)
    result = sizing.size(prefill, sizing.step_ms_curve(DECODE), rate=10, output_tokens=100,
                         ttft_ms=300, itl_ms=52)  # fmt: skip
    # u = 500 x 0.2 = 100 tokens, s = 0.1 s; k = (0.3 - 0.1) / 0.1 = 2 -> r_max = 4/5.
    assert result.uncached_tokens == pytest.approx(100.0)
    assert result.max_utilization == pytest.approx(0.8)
    assert result.prefill_workers == 2  # ceil(10 x 100 / (1000 x 0.8)) = ceil(1.25)
    # batch 17 steps in 52 ms: 10 x 100 x 0.052 = 52 sequences at once -> ceil(52 / 17) = 4.
    assert (result.decode_batch, result.decode_workers) == (17, 4)


def test_an_unreachable_ttft_target_is_an_error(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps(ROUTING))
    (tmp_path / "d.json").write_text(json.dumps(DECODE))
    argv = ["--routing", str(tmp_path / "r.json"), "--decode-profile", str(tmp_path / "d.json"),
            "--rate", "1", "--ttft-ms", "50", "--itl-ms", "60"]  # fmt: skip
    assert sizing.main(argv) == 1
    assert "no number of workers meets it" in capsys.readouterr().err
    argv[argv.index("50")] = "1000"
    assert sizing.main([*argv, "--output", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["sizing"]["prefill_workers"] == 1
