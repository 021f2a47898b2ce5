"""`pdserve bench compare`: workloads, ratio orientation, the report, and one end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.anchor import (
    WORKLOAD_NAMES,
    WORKLOADS,
    Endpoint,
    build_prompts,
    request_inputs,
    select_workloads,
)
from pdserve.bench.anchor_report import (
    build_report,
    failed_requests,
    markdown_table,
    save_report,
    summary_rows,
)
from pdserve.bench.client import build_payload
from pdserve.bench.compare import advantage
from pdserve.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_ratios_are_oriented_so_above_one_means_pdserve_is_better() -> None:
    # latency: pdserve 50 ms against the baseline's 100 ms is 2x better
    assert advantage(50.0, 100.0, higher_is_better=False) == pytest.approx(2.0)
    assert advantage(200.0, 100.0, higher_is_better=False) == pytest.approx(0.5)
    # throughput: pdserve 150 tok/s against 100 tok/s is 1.5x better
    assert advantage(150.0, 100.0, higher_is_better=True) == pytest.approx(1.5)
    assert advantage(None, 100.0, higher_is_better=True) is None
    assert advantage(0.0, 100.0, higher_is_better=False) is None  # no division by zero


def test_default_workloads_are_the_issues() -> None:
    by_name = {w.name: w for w in WORKLOADS}
    single, loop, prefix = by_name["single"], by_name["closed-loop"], by_name["shared-prefix"]
    assert (single.clients, single.input_len, single.output_len) == (1, 512, 128)
    assert [f.key for f in single.figures] == ["median_itl_ms", "median_ttft_ms"]
    assert (loop.clients, loop.output_len, loop.lengths_in_tokens) == (32, 64, False)
    assert [f.key for f in loop.figures] == ["output_throughput"]
    assert (prefix.clients, prefix.prefix_len, prefix.input_len, prefix.output_len) == (
        16, 448, 48, 32,
    )  # fmt: skip
    assert prefix.cache_prompt and not single.cache_prompt and not loop.cache_prompt
    assert len({w.seed_offset for w in WORKLOADS}) == len(WORKLOADS)


def test_closed_loop_prompts_are_30_to_220_words_with_fixed_output_and_seeded() -> None:
    (loop,) = select_workloads(["closed-loop"], [])
    prompts = build_prompts(loop, tokenizer=None, seed=0)
    words = [len(p.prompt.split()) for p in prompts]
    assert len(prompts) == loop.num_requests
    assert min(words) >= 30 and max(words) <= 220 and max(words) - min(words) > 100
    assert {p.expected_output_len for p in prompts} == {64}
    assert prompts == build_prompts(loop, tokenizer=None, seed=0)  # same prompts every target
    assert prompts != build_prompts(loop, tokenizer=None, seed=1)


def test_token_sized_workloads_need_a_tokenizer_and_share_their_prefix(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    single, prefix = select_workloads(["single", "shared-prefix"], [])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_prompts(single, tokenizer=None, seed=0)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    small = select_workloads(["shared-prefix"], ["shared-prefix.prefix_len=40",
                                                 "shared-prefix.input_len=10"])[0]  # fmt: skip
    prompts = build_prompts(small, tok, seed=0)
    shared = prompts[0].prompt[: len(prompts[0].prompt) // 2]
    assert all(p.prompt.startswith(shared) for p in prompts)
    assert len({p.prompt for p in prompts}) == len(prompts)
    assert prefix.num_requests == len(build_prompts(prefix, tok, seed=0))


def test_overrides_and_unknown_names_are_clear() -> None:
    (single,) = select_workloads(["single"], ["single.num_requests=2", "closed-loop.clients=3"])
    assert single.num_requests == 2
    with pytest.raises(ValueError, match="unknown workloads"):
        select_workloads(["nope"], [])
    with pytest.raises(ValueError, match="WORKLOAD.FIELD=INT"):
        select_workloads(["single"], ["single.figures=1"])
    with pytest.raises(ValueError, match="not an integer"):
        select_workloads(["single"], ["single.clients=two"])
    with pytest.raises(ValueError, match="more clients than requests"):
        select_workloads(["single"], ["single.clients=9"])


def test_request_bodies_ask_for_exact_lengths_and_carry_cache_prompt() -> None:
    loop, prefix = select_workloads(["closed-loop", "shared-prefix"], [])
    samples = build_prompts(loop, tokenizer=None, seed=0)[:2]
    ep = Endpoint("x", "http://127.0.0.1:1")
    body = build_payload(request_inputs(ep, "m", loop, samples)[0])
    assert body["ignore_eos"] is True and body["max_tokens"] == 64 and body["temperature"] == 0
    assert body["cache_prompt"] is False and body["stream"] is True
    assert build_payload(request_inputs(ep, "m", prefix, samples)[0])["cache_prompt"] is True


def _fake_results() -> dict:
    return {
        "llama.cpp": {"single": {"median_itl_ms": 40.0, "median_ttft_ms": 1500.0},
                      "closed-loop": {"output_throughput": 75.0},
                      "shared-prefix": {"median_itl_ms": 170.0}},
        "pdserve-disagg": {"single": {"median_itl_ms": 120.0, "median_ttft_ms": 1000.0},
                           "closed-loop": {"output_throughput": 150.0},
                           "shared-prefix": {"median_itl_ms": 340.0}},
    }  # fmt: skip


def test_report_has_every_figure_and_oriented_ratios(tmp_path: Path) -> None:
    report = build_report(WORKLOADS, "llama.cpp", ["pdserve-disagg"], _fake_results(), {"x": 1})
    assert report["x"] == 1 and "> 1 means pdserve is better" in report["ratio_definition"]
    rows = {(r["workload"], r["figure"]): r for r in report["summary"]}
    assert set(rows) == {("single", "median_itl_ms"), ("single", "median_ttft_ms"),
                         ("closed-loop", "output_throughput"),
                         ("shared-prefix", "median_itl_ms")}  # fmt: skip
    assert rows["single", "median_itl_ms"]["ratios"]["pdserve-disagg"] == pytest.approx(1 / 3)
    assert rows["single", "median_ttft_ms"]["ratios"]["pdserve-disagg"] == pytest.approx(1.5)
    assert rows["closed-loop", "output_throughput"]["ratios"]["pdserve-disagg"] == 2.0
    assert [w["name"] for w in report["workloads"]] == list(WORKLOAD_NAMES)
    assert report["workloads"][0]["results"]["llama.cpp"]["median_itl_ms"] == 40.0
    table = markdown_table(report)
    row = "| 1 client, 512-token prompts, 128 out | median ITL (ms) | 40.0 | 120.0 | 0.33x |"
    assert row in table
    assert "| 32 closed-loop clients, 30-220-word prompts, 64 out | output tok/s |" in table
    paths = save_report(report, tmp_path)
    assert json.loads(paths[0].read_text())["summary"] == report["summary"]
    assert paths[2].read_bytes()[:8] == PNG_MAGIC


def test_a_missing_figure_gives_no_ratio() -> None:
    results = _fake_results()
    del results["pdserve-disagg"]["closed-loop"]
    rows = summary_rows(WORKLOADS, "llama.cpp", ["pdserve-disagg"], results)
    loop = next(r for r in rows if r["workload"] == "closed-loop")
    assert loop["values"]["pdserve-disagg"] is None and loop["ratios"]["pdserve-disagg"] is None


def test_failed_requests_are_counted_per_target() -> None:
    results = _fake_results()
    results["llama.cpp"]["single"]["failed"] = 1
    results["llama.cpp"]["closed-loop"]["failed"] = 2
    results["pdserve-disagg"]["single"]["failed"] = 0
    report = build_report(WORKLOADS, "llama.cpp", ["pdserve-disagg"], results, {})
    assert failed_requests(report) == {"llama.cpp": 3}
    assert report["summary"][0]["failed"] == {"llama.cpp": 1, "pdserve-disagg": 0}


def test_bad_flags_exit_nonzero(capsys) -> None:
    rc = main(["bench", "compare", "--baseline-url", "http://127.0.0.1:9", "--deployments", "x"])
    assert rc == 1 and "unknown deployments" in capsys.readouterr().err


def test_compare_end_to_end_against_a_tiny_cluster(tiny_llama: Path, tmp_path: Path) -> None:
    """A tiny-model cluster is the baseline; the command starts its own aggregated cluster."""
    from pdserve.bench.sweep import start_deployment, stop_deployment, wait_ready

    serve = ["--model", str(tiny_llama), "--kv-cache-memory", "16MiB", "--max-model-len", "256"]
    baseline = start_deployment("aggregated", serve, tmp_path)
    try:
        wait_ready(baseline, 120.0)
        small = ["single.num_requests=2", "single.input_len=24", "single.output_len=6",
                 "closed-loop.clients=4", "closed-loop.num_requests=6", "closed-loop.input_len=12",
                 "closed-loop.output_len=5", "shared-prefix.clients=3",
                 "shared-prefix.num_requests=4", "shared-prefix.prefix_len=32",
                 "shared-prefix.input_len=8", "shared-prefix.output_len=5"]  # fmt: skip
        argv = ["bench", "compare", "--baseline-url", baseline.base_url,
                "--baseline-label", "base", "--model", str(tiny_llama),
                "--deployments", "aggregated", "--serve-args", " ".join(serve[2:]),
                "--output-dir", str(tmp_path / "out")]  # fmt: skip
        for item in small:
            argv += ["--set", item]
        assert main(argv) == 0
    finally:
        stop_deployment(baseline)
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert report["baseline"] == "base" and report["targets"] == ["pdserve-aggregated"]
    for w in report["workloads"]:
        for label in ("base", "pdserve-aggregated"):
            result = w["results"][label]
            assert result["completed"] == w["num_requests"] and result["failed"] == 0
            assert result["output_len_exact"], (w["name"], label, result["output_lens_seen"])
            assert result["slots_erased"] is None  # a pdserve baseline has no llama.cpp slots
    for row in report["summary"]:
        # a tiny model's tokens can arrive several to a read: its median ITL may be 0
        assert row["values"]["base"] >= 0 and row["values"]["pdserve-aggregated"] >= 0
        if row["figure"] != "median_itl_ms":
            assert row["ratios"]["pdserve-aggregated"] > 0
    assert report["flags"]["deployments"] == ["aggregated"]
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == PNG_MAGIC
