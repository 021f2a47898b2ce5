"""Same-run comparison with a baseline server (llama.cpp's `llama-server`): `pdserve bench compare`.

Three fixed workloads (issue 10's) run against the baseline URL and then against each pdserve
target, back to back, with the same seeded prompts and the same request bodies:

- `single`: 1 client, a 512-token prompt, 128 output tokens; median ITL and median TTFT.
- `closed-loop`: 32 closed-loop clients, prompts of 30-220 random words, 64 output tokens;
  output tok/s.
- `shared-prefix`: 16 clients, a 448-token prefix shared by every prompt + 48 unique tokens,
  32 output tokens; median ITL.

Every request is greedy with `ignore_eos`, so both servers produce exactly the asked length
(checked per run: `output_len_exact`). Requests are sent by the `pdserve bench serve` machinery
(`runner.run_load`, `client.send_request`, `metrics.calculate_metrics`), so both servers are
measured by one client. The figures, their ratios and how to read them are built in
`pdserve.bench.anchor_report`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from pdserve.bench.client import COMPLETIONS_ENDPOINT, RequestInput, RequestOutput, headers
from pdserve.bench.datasets import (
    RandomDatasetConfig,
    SampleRequest,
    Tokenizer,
    length_range,
    random_requests,
)
from pdserve.bench.metrics import METRICS, calculate_metrics
from pdserve.bench.report import RunInfo, build_result, now_stamp
from pdserve.bench.runner import LoadConfig, probe, run_load

PERCENTILES = (50.0, 99.0)
WARMUP_WORDS = 16  # the warm-up request: a short prompt unrelated to every workload's prompts
WARMUP_TOKENS = 4
HTTP_TIMEOUT_S = 30.0


@dataclass(slots=True, frozen=True)
class Figure:
    """One headline number of a workload: a key of the `pdserve bench serve` result JSON."""

    key: str
    label: str
    higher_is_better: bool


ITL = Figure("median_itl_ms", "median ITL (ms)", higher_is_better=False)
TTFT = Figure("median_ttft_ms", "median TTFT (ms)", higher_is_better=False)
OUTPUT_TPS = Figure("output_throughput", "output tok/s", higher_is_better=True)


@dataclass(slots=True, frozen=True)
class Workload:
    """A closed loop of `clients` clients sending `num_requests` prompts, each to the end."""

    name: str
    clients: int
    num_requests: int
    input_len: int  # tokens with `lengths_in_tokens`, else words
    output_len: int  # exactly this many tokens per request (ignore_eos)
    figures: tuple[Figure, ...]
    range_ratio: float = 0.0  # prompt lengths uniform in [L*(1-r), L*(1+r)]
    prefix_len: int = 0  # a prefix of this many tokens shared by every prompt
    lengths_in_tokens: bool = True
    # llama.cpp's per-request `cache_prompt`: reuse a slot's cached prompt prefix. Off unless
    # sharing a prefix is the point of the workload; pdserve ignores the field.
    cache_prompt: bool = False
    seed_offset: int = 0  # added to the run's seed: workloads never share prompts

    @property
    def description(self) -> str:
        unit = "token" if self.lengths_in_tokens else "word"
        low, high = length_range(self.input_len, self.range_ratio)
        size = f"{low}-{high}-{unit}" if high > low else f"{low}-{unit}"
        prompt = f"{self.prefix_len}-token shared prefix + {size}" if self.prefix_len else size
        who = "1 client" if self.clients == 1 else f"{self.clients} closed-loop clients"
        return f"{who}, {prompt} prompts, {self.output_len} out"

    def __post_init__(self) -> None:
        for name in ("clients", "num_requests", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"workload {self.name}: {name} must be >= 1")
        if self.clients > self.num_requests:
            raise ValueError(f"workload {self.name}: more clients than requests")


WORKLOADS: tuple[Workload, ...] = (
    Workload("single", clients=1, num_requests=5, input_len=512, output_len=128,
             figures=(ITL, TTFT), seed_offset=0),
    # 125 words +- 76 %: 30-220 words, 124 tokens on average with the default model's tokenizer
    Workload("closed-loop", clients=32, num_requests=96, input_len=125, range_ratio=0.76,
             output_len=64, figures=(OUTPUT_TPS,), lengths_in_tokens=False, seed_offset=1),
    Workload("shared-prefix", clients=16, num_requests=32, prefix_len=448, input_len=48,
             output_len=32, figures=(ITL,), cache_prompt=True, seed_offset=2),
)  # fmt: skip
WORKLOAD_NAMES = tuple(w.name for w in WORKLOADS)


def select_workloads(names: Sequence[str], overrides: Sequence[str]) -> list[Workload]:
    """The named workloads (in the given order), with `NAME.FIELD=INT` overrides applied."""
    by_name = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; choose from {list(WORKLOAD_NAMES)}")
    chosen = {n: by_name[n] for n in names}
    for item in overrides:
        name, field, value = _parse_override(item)
        if name in chosen:
            chosen[name] = dataclasses.replace(chosen[name], **{field: value})
        elif name not in by_name:
            raise ValueError(f"--set {item!r}: unknown workload {name!r}")
    return list(chosen.values())


OVERRIDABLE = ("clients", "num_requests", "input_len", "output_len", "prefix_len")


def _parse_override(item: str) -> tuple[str, str, int]:
    target, sep, value = item.partition("=")
    name, dot, field = target.partition(".")
    if not sep or not dot or field not in OVERRIDABLE:
        raise ValueError(f"--set expects WORKLOAD.FIELD=INT with FIELD in {OVERRIDABLE}: {item!r}")
    try:
        return name, field, int(value)
    except ValueError:
        raise ValueError(f"--set {item!r}: {value!r} is not an integer") from None


def build_prompts(w: Workload, tokenizer: Tokenizer | None, seed: int) -> list[SampleRequest]:
    """The workload's prompts: the same for every target of a run (seeded), fixed output length."""
    if w.lengths_in_tokens and tokenizer is None:
        raise ValueError(f"workload {w.name} sizes prompts in tokens: it needs a tokenizer")
    cfg = RandomDatasetConfig(
        num_prompts=w.num_requests,
        input_len=w.input_len,
        output_len=w.output_len,
        range_ratio=w.range_ratio,
        prefix_len=w.prefix_len,
        seed=seed + w.seed_offset,
    )
    samples = random_requests(cfg, tokenizer if w.lengths_in_tokens else None)
    # random_requests also spreads output lengths by range_ratio; every request here asks for
    # exactly output_len tokens.
    return [dataclasses.replace(s, expected_output_len=w.output_len) for s in samples]


@dataclass(slots=True, frozen=True)
class Endpoint:
    """A running OpenAI-compatible server to measure."""

    label: str
    base_url: str
    api_key: str | None = None


def request_inputs(
    ep: Endpoint, model: str, w: Workload, samples: Iterable[SampleRequest]
) -> list[RequestInput]:
    extra = {"cache_prompt": w.cache_prompt}
    return [
        RequestInput(
            api_url=f"{ep.base_url}{COMPLETIONS_ENDPOINT}",
            model=model,
            prompt=s.prompt,
            prompt_len=s.prompt_len,
            output_len=s.expected_output_len,
            chat=False,
            ignore_eos=True,
            temperature=0.0,
            api_key=ep.api_key,
            extra_body=extra,
        )
        for s in samples
    ]


def first_model(ep: Endpoint) -> str:
    url = f"{ep.base_url}/v1/models"
    try:
        resp = httpx.get(url, headers=headers(ep.api_key), timeout=HTTP_TIMEOUT_S)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise RuntimeError(f"{ep.label}: cannot list models at {url} ({exc})") from None


def warm_up(ep: Endpoint, model: str) -> None:
    """One short request (not measured): first-request costs stay out of the figures."""
    text = " ".join(["warm"] * WARMUP_WORDS)
    req = RequestInput(
        api_url=f"{ep.base_url}{COMPLETIONS_ENDPOINT}", model=model, prompt=text,
        prompt_len=WARMUP_WORDS, output_len=WARMUP_TOKENS, chat=False, ignore_eos=True,
        api_key=ep.api_key, extra_body={"cache_prompt": False},
    )  # fmt: skip
    out = probe(req)
    if not out.success:
        raise RuntimeError(f"{ep.label}: the warm-up request failed: {out.error}")


def erase_llamacpp_slots(ep: Endpoint) -> int | None:
    """Empties every slot of a llama-server (its per-slot prompt cache); None when not possible.

    llama-server allows it only when started with `--slot-save-path`; other servers have no
    `/slots` route. Returns the number of slots erased.
    """
    try:
        resp = httpx.get(f"{ep.base_url}/slots", headers=headers(ep.api_key), timeout=10.0)
        if resp.status_code != 200:
            return None
        ids = [int(slot["id"]) for slot in resp.json()]
        for slot_id in ids:
            done = httpx.post(
                f"{ep.base_url}/slots/{slot_id}",
                params={"action": "erase"},
                headers=headers(ep.api_key),
                timeout=HTTP_TIMEOUT_S,
            )
            if done.status_code != 200:
                return None
        return len(ids)
    except (httpx.HTTPError, ValueError, TypeError, KeyError):
        return None


def measure(ep: Endpoint, model: str, w: Workload, samples: list[SampleRequest]) -> dict[str, Any]:
    """Runs one workload against one endpoint: a `pdserve bench serve` result dict, plus extras."""
    erased = erase_llamacpp_slots(ep)
    load_before = os.getloadavg()[0]
    inputs = request_inputs(ep, model, w, samples)
    load = LoadConfig(max_concurrency=w.clients, disable_tqdm=True, keep_alive=False)
    run = run_load(inputs, load)
    metrics = calculate_metrics(run.outputs, run.duration, run.start, PERCENTILES)
    info = RunInfo(
        date=now_stamp(), backend="openai", base_url=ep.base_url, endpoint=COMPLETIONS_ENDPOINT,
        model_id=model, tokenizer_id=None, num_prompts=len(inputs), request_rate=math.inf,
        burstiness=1.0, max_concurrency=w.clients, goodput_slo_ms={},
    )  # fmt: skip
    result = build_result(info, metrics, run.outputs, METRICS, detailed=False)
    result.update(
        output_len_exact=all(n == w.output_len for n in metrics.output_lens),
        output_lens_seen=sorted(set(metrics.output_lens)),
        # ITL is measured between streamed text chunks: one token per chunk makes it per token
        mean_chunks_per_request=_mean_chunks(run.outputs),
        slots_erased=erased,
        load_average_1m_before=load_before,
        load_average_1m_after=os.getloadavg()[0],
    )
    return result


def _mean_chunks(outputs: Sequence[RequestOutput]) -> float:
    done = [len(o.chunk_times) for o in outputs if o.success]
    return sum(done) / len(done) if done else 0.0


def measure_endpoint(
    ep: Endpoint, workloads: Sequence[Workload], prompts: dict[str, list[SampleRequest]]
) -> dict[str, dict[str, Any]]:
    """Every workload against one endpoint, in order: {workload name: result}."""
    model = first_model(ep)
    warm_up(ep, model)
    results = {}
    for w in workloads:
        print(f"  {ep.label}: {w.name} ({w.description}) ...", flush=True)
        results[w.name] = measure(ep, model, w, prompts[w.name])
        if results[w.name]["completed"] == 0:
            raise RuntimeError(f"{ep.label}: every {w.name} request failed: "
                               f"{results[w.name]['errors'][:3]}")  # fmt: skip
    return results
