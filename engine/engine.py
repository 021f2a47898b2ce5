"""LLMEngine: add requests, step, read outputs. The step reads as three calls:
schedule() -> execute + sample -> postprocess().

Not thread-safe: one thread drives it (see engine_loop.py for the serving wrapper).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from contract.errors import ErrorKind
from contract.histogram import ITERATION_TOKENS_BUCKETS, QUEUE_TIME_BUCKETS, HistogramSnapshot
from contract.limits import DEFAULT_MAX_MODEL_LEN
from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.kv_cache_manager import KVCacheManager
from engine.kv_events import KVEventLog
from engine.logprobs import prompt_logprobs
from engine.model_loader import load_hf_config, load_model, model_folder
from engine.model_runner import KVCacheSpec, ModelRunner, kv_pool_bytes
from engine.outputs import PrefillResult, RequestOutput, TokenLogprob
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from engine.spec_decode.draft_model import DraftModelProposer, DraftRunnerOptions
from engine.spec_decode.rejection_sampler import RejectionSampler
from engine.spec_decode.speculator import Speculator
from engine.spec_decode.stats import SpecDecodeStats
from engine.stop_checker import StopChecker
from engine.structured_output import StructuredOutputManager, accept

log = logging.getLogger(__name__)

_DEFAULT_MAX_MODEL_LEN = DEFAULT_MAX_MODEL_LEN  # without --max-model-len: min(model's, this)


class QueueFullError(RuntimeError):
    """The bounded waiting queue (or the KV pool, for an import) has no room now; retry later."""

    kind = ErrorKind.OVERLOADED


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_reserved: int
    num_held: int
    num_free_blocks: int
    num_blocks: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # ... of which were served by it
    spec_decode: SpecDecodeStats | None = None  # None: speculative decoding is off
    # Seconds from arrival to first scheduled, per request; tokens scheduled, per step.
    queue_time: HistogramSnapshot = field(
        default_factory=lambda: HistogramSnapshot.empty(QUEUE_TIME_BUCKETS)
    )
    iteration_tokens: HistogramSnapshot = field(
        default_factory=lambda: HistogramSnapshot.empty(ITERATION_TOKENS_BUCKETS)
    )


@dataclass(slots=True)
class ImportReservation:
    block_ids: list[int]  # local blocks covering the whole prompt
    num_cached_blocks: int  # leading blocks already valid through the local prefix cache


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = model_folder(config.model)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = _pick_device(config.device)
        self.dtype = _pick_dtype(config.dtype, self.device)
        hf_config, _ = load_hf_config(self.model_path)
        max_len = _max_model_len(config.max_model_len, hf_config)
        loaded = load_model(self.model_path, self.dtype, self.device, max_len)
        self.hf_config = loaded.hf_config
        self.architecture = loaded.architecture
        self.model_fingerprint = loaded.fingerprint
        self.num_params = loaded.num_params
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        args = loaded.model.args
        self.vocab_size = args.vocab_size
        weights_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        kv_bytes = kv_pool_bytes(
            self.device, config.kv_cache_memory, config.gpu_memory_utilization, weights_bytes
        )
        spec = dict(
            num_layers=args.num_layers,
            num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            block_size=config.block_size,
            dtype=self.dtype,
        )
        self.runner = ModelRunner(
            loaded,
            spec,
            kv_bytes,
            self.device,
            config.attention_backend,
            enforce_eager=config.enforce_eager,
            max_num_seqs=config.max_num_seqs,
            max_model_len=max_len,
        )
        self.max_model_len = self._fit_max_model_len(max_len)
        self.kv_events = KVEventLog()  # what the prefix cache gained and lost, for routers
        self.pool = BlockPool(
            self.runner.spec.num_blocks, config.enable_prefix_caching, self.kv_events
        )
        self.kv = KVCacheManager(self.pool, config.block_size)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_token_ids = _eos_ids(self.model_path, self.hf_config, self.tokenizer)
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids, config.seed)
        self.structured = StructuredOutputManager(
            self.tokenizer, self.vocab_size, self.eos_token_ids
        )
        self.stop_checker = StopChecker(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.speculator = self._make_speculator()
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []
        log.info(
            "engine ready: %s (%s, %s params) on %s/%s, %d KV blocks of %d tokens, %s%s",
            self.model_path,
            self.architecture,
            f"{self.num_params:,}",
            self.device,
            self.dtype,
            self.pool.num_blocks,
            config.block_size,
            self.runner.describe(),
            f"; {self.speculator.describe()}" if self.speculator else "",
        )

    # -- public API -------------------------------------------------------------------------

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.runner.kv_cache

    @property
    def kv_spec(self) -> KVCacheSpec:
        return self.runner.spec

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
    ) -> None:
        request = self._new_request(request_id, prompt_token_ids, params, prefill_only)
        self.requests[request_id] = request
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request.status in (RequestStatus.WAITING, RequestStatus.RUNNING):
            self.scheduler.finish(request, "abort")
            self._pending.append(self._output(request, [], None, finished=True))
        else:  # reserved or held: only blocks to give back
            self.kv.free(request)
            request.status = RequestStatus.FINISHED

    def release_held(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None and request.status == RequestStatus.HELD:
            self.abort_request(request_id)

    def held_block_ids(self, request_id: str) -> list[int]:
        request = self.requests.get(request_id)
        if request is None or request.status != RequestStatus.HELD:
            raise KeyError(f"no held request {request_id!r}")
        return list(request.block_ids)

    def reserve_import(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> ImportReservation:
        # The prompt was computed where the KV comes from: so were its prompt logprobs.
        params = params.clone(prompt_logprobs=None)
        request = self._new_request(request_id, prompt_token_ids, params, prefill_only=False)
        hits = self.kv.find_prefix_hits(request)
        if not self.kv.allocate(
            request, request.num_tokens - len(hits) * self.config.block_size, hits
        ):
            raise QueueFullError(
                f"not enough free KV blocks to import {len(prompt_token_ids)} tokens"
            )
        request.num_cached_tokens = len(hits) * self.config.block_size
        self.kv.count_lookup(request.num_prompt_tokens, len(hits))
        request.status = RequestStatus.RESERVED
        self.requests[request_id] = request
        return ImportReservation(list(request.block_ids), len(hits))

    def commit_import(
        self, request_id: str, first_token: int, first_logprob: TokenLogprob | None = None
    ) -> None:
        request = self.requests.get(request_id)
        if request is None or request.status != RequestStatus.RESERVED:
            raise KeyError(f"no reserved import {request_id!r}")
        if not 0 <= first_token < self.vocab_size:
            self.abort_request(request_id)
            raise ValueError(
                f"first token {first_token} outside the vocabulary [0, {self.vocab_size})"
            )
        if not accept(request.matcher, first_token):
            self.abort_request(request_id)
            raise ValueError(f"first token {first_token} is not allowed by the request's grammar")
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_full_blocks(request)
        if request.generator is not None and not request.params.greedy:
            # The prefill side drew the first token: advance this generator past that draw so
            # a seeded request samples the same tokens as it would in one engine.
            self.sampler.skip_draw(request.generator)
        self.scheduler.add(request)
        self._pending.extend(self._accept_tokens([request], [first_token], [first_logprob]))

    def cancel_import(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None and request.status == RequestStatus.RESERVED:
            self.abort_request(request_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block hash (blocks in use keep their contents, just unshared)."""
        self.pool.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        if self._pending:
            # Outputs made outside a step (imported first tokens, aborts) go out at once rather
            # than after the next forward pass: that is a whole decode step of TTFT saved.
            outputs, self._pending = self._pending, []
            return outputs
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.sampler)
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        logits = self.runner.execute(sched)
        return self._postprocess(sched, logits)

    def stats(self) -> EngineStats:
        by_status = {s: 0 for s in RequestStatus}
        for request in self.requests.values():
            by_status[request.status] += 1
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_reserved=by_status[RequestStatus.RESERVED],
            num_held=by_status[RequestStatus.HELD],
            num_free_blocks=self.pool.num_free_blocks,
            num_blocks=self.pool.num_blocks,
            kv_cache_usage=self.pool.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            spec_decode=self.speculator.stats.copy() if self.speculator else None,
            queue_time=self.scheduler.queue_time.snapshot(),
            iteration_tokens=self.scheduler.iteration_tokens.snapshot(),
        )

    # -- internals --------------------------------------------------------------------------

    def _postprocess(self, sched: SchedulerOutput, logits: torch.Tensor) -> list[RequestOutput]:
        logits = self._take_prompt_logprobs(sched.scheduled, logits)
        sampling = [s for s in sched.scheduled if s.samples]
        for s in sched.scheduled:
            # Proposals count as computed only once verified (below): until then their KV is
            # not part of the sequence and their blocks are never entered in the prefix cache.
            s.request.num_computed_tokens += s.num_new_tokens - len(s.spec_token_ids)
            self.kv.cache_full_blocks(s.request)
        if not sampling:
            return []
        if not any(s.spec_token_ids for s in sampling):
            return self._sample(logits, [s.request for s in sampling])
        return self._postprocess_speculative(sampling, logits)

    def _take_prompt_logprobs(
        self, scheduled: list[ScheduledRequest], logits: torch.Tensor
    ) -> torch.Tensor:
        """Turn each request's prompt-logprob rows (the first of its `num_logits`, see
        `ScheduledRequest.prompt_logit_positions`) into its prompt logprobs; returns the rows
        that sample, in schedule order, as if no prompt row had been computed."""
        if not any(s.request.prompt_logprobs is not None for s in scheduled):
            return logits
        keep: list[int] = []
        row = 0
        for s in scheduled:
            positions, num_rows = s.prompt_logit_positions, s.num_logits
            if positions:
                r = s.request
                next_ids = r.prompt_token_ids[positions.start + 1 : positions.stop + 1]
                rows = logits[row : row + len(positions), : self.vocab_size]
                r.prompt_logprobs.extend(prompt_logprobs(rows, next_ids, r.params.prompt_logprobs))
            keep.extend(range(row + len(positions), row + num_rows))
            row += num_rows
        return logits[keep]

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[RequestOutput]:
        """One token per request, under its grammar's bitmask where it has one."""
        bitmask = self.structured.fill_bitmask([r.matcher for r in requests])
        sampled = self.sampler(logits, requests, bitmask)
        for request, token in zip(requests, sampled.token_ids, strict=True):
            if not accept(request.matcher, token):  # the bitmask allowed it: a bug if not
                log.error("grammar refused sampled token %d of %s", token, request.request_id)
        return self._accept_tokens(requests, sampled.token_ids, sampled.logprobs)

    def _postprocess_speculative(
        self, sampling: list[ScheduledRequest], logits: torch.Tensor
    ) -> list[RequestOutput]:
        """Logit rows: each sampling request's last row, plus one per proposal before it."""
        plain, spec, plain_rows, spec_rows, row = [], [], [], [], 0
        for s in sampling:
            n = 1 + len(s.spec_token_ids)
            (spec if s.spec_token_ids else plain).append(s)
            (spec_rows if s.spec_token_ids else plain_rows).extend(range(row, row + n))
            row += n
        outputs = []
        if plain:
            outputs += self._sample(logits[plain_rows], [s.request for s in plain])
        bitmask = self.structured.fill_verify_bitmask(
            [(s.request.matcher, s.spec_token_ids) for s in spec]
        )
        verified = self.rejection_sampler(
            logits[spec_rows],
            [s.request for s in spec],
            [s.spec_token_ids for s in spec],
            [s.request.spec_probs for s in spec],
            bitmask,
        )
        for s, v in zip(spec, verified, strict=True):
            request = s.request
            request.spec_token_ids, request.spec_probs = [], None
            out = self._accept(request, v.token_ids, v.logprobs, advance_matcher=True)
            self.speculator.stats.observe(
                len(s.spec_token_ids), v.num_accepted, len(out.new_token_ids)
            )
            if request.status == RequestStatus.RUNNING:
                request.num_computed_tokens = request.num_tokens - 1  # the accepted proposals
                self.kv.trim(request)  # roll back blocks that only held rejected proposals
                self.kv.cache_full_blocks(request)
            outputs.append(out)
        return outputs

    def _accept_tokens(
        self, requests: list[Request], tokens: list[int], logprobs
    ) -> list[RequestOutput]:
        return [
            self._accept(request, [token], [logprob])
            for request, token, logprob in zip(requests, tokens, logprobs, strict=True)
        ]

    def _accept(
        self, request: Request, tokens: list[int], logprobs: list, advance_matcher: bool = False
    ) -> RequestOutput:
        """Append `tokens` one at a time, stopping at the first that finishes the request.
        `advance_matcher`: feed each token to the request's grammar as it is appended (verified
        proposals; a plain step's sampled token has advanced it already)."""
        kept, kept_logprobs = [], []
        for token, logprob in zip(tokens, logprobs, strict=True):
            if advance_matcher and not accept(request.matcher, token):  # masked: a bug if not
                log.error("grammar refused verified token %d of %s", token, request.request_id)
            request.append_token(token)
            kept.append(token)
            if logprob is not None:
                request.output_logprobs.append(logprob)
                kept_logprobs.append(logprob)
            if request.prefill_only:
                return self._finish_prefill(request, token, logprob)
            stop = self.stop_checker.check(request)
            if stop is not None:
                request.stop_reason = stop.stop_reason
                self.scheduler.finish(request, stop.finish_reason)
                del self.requests[request.request_id]
                break
        finished = request.status == RequestStatus.FINISHED
        return self._output(request, kept, kept_logprobs or None, finished=finished)

    def _finish_prefill(self, request: Request, token: int, logprob) -> RequestOutput:
        self.scheduler.finish(request, "prefill", keep_blocks=True)
        out = self._output(request, [token], [logprob] if logprob else None, finished=True)
        out.prefill = PrefillResult(
            list(request.block_ids),
            request.num_prompt_tokens,
            token,
            logprob[0] if logprob else None,
        )
        return out

    def _output(
        self, request: Request, tokens: list[int], logprobs, *, finished: bool
    ) -> RequestOutput:
        prompt = None
        if request.prompt_logprobs is not None and request.num_output_tokens:
            # Complete once the first token is sampled: it goes out with that token, once.
            prompt, request.prompt_logprobs = request.prompt_logprobs, None
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=tokens,
            new_logprobs=logprobs,
            finished=finished,
            finish_reason=request.finish_reason if finished else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            stop_reason=request.stop_reason if finished else None,
            prompt_logprobs=prompt,
        )

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as the tokenizer spells it at the start of a text and after a space
        (vLLM's two spellings), without duplicates."""
        sequences: list[list[int]] = []
        for word in words:
            for spelling in (word.lstrip(), " " + word.lstrip()):
                ids = list(self.tokenizer.encode(spelling, add_special_tokens=False))
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def _new_request(
        self, request_id: str, prompt_token_ids, params, prefill_only: bool
    ) -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise ValueError("the engine takes n=1 requests; fan out n>1 before adding")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_prompt(prompt_token_ids)
        for name, ids in (
            ("stop_token_ids", params.stop_token_ids),
            ("allowed_token_ids", params.allowed_token_ids),
            ("logit_bias", list(params.logit_bias)),
        ):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"{name} {bad} outside the vocabulary [0, {self.vocab_size})")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)")
        request = Request(request_id, list(prompt_token_ids), params, prefill_only=prefill_only)
        request.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        if params.seed is not None:
            request.generator = torch.Generator().manual_seed(params.seed)
        if params.structured_outputs is not None:  # ValueError if it does not compile
            request.matcher = self.structured.matcher(params.structured_outputs)
        return request

    def check_prompt(self, prompt_token_ids) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        for t in prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t!r} outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens but max_model_len is {self.max_model_len}: "
                "no room to generate"
            )

    def _make_speculator(self) -> Speculator | None:
        spec = self.config.speculative_config
        if spec is None:
            return None
        draft = None
        if spec.method == "draft_model":
            opts = DraftRunnerOptions(
                num_blocks=self.runner.spec.num_blocks,
                block_size=self.config.block_size,
                dtype=self.dtype,
                device=self.device,
                attention_backend=self.config.attention_backend,
                enforce_eager=self.config.enforce_eager,
                max_num_seqs=self.config.max_num_seqs,
                max_model_len=self.max_model_len,
            )
            draft = DraftModelProposer(spec.model, self.vocab_size, opts)
        return Speculator(spec, self.kv, self.max_model_len, draft)

    def _fit_max_model_len(self, wanted: int) -> int:
        capacity = self.runner.spec.num_blocks * self.config.block_size
        if wanted <= capacity:
            return wanted
        if self.config.max_model_len is not None:
            raise ValueError(
                f"max_model_len {wanted} exceeds the KV pool ({capacity} tokens); "
                "raise kv_cache_memory or lower max_model_len"
            )
        log.warning("max_model_len lowered to %d to fit the KV pool", capacity)
        return capacity


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _max_model_len(wanted: int | None, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or _DEFAULT_MAX_MODEL_LEN
    if wanted is None:
        return min(limit, _DEFAULT_MAX_MODEL_LEN)
    if wanted > limit:
        raise ValueError(
            f"max_model_len {wanted} exceeds the model's max_position_embeddings {limit}"
        )
    return wanted


def _eos_ids(path: Path, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    gen = path / "generation_config.json"
    if gen.is_file():
        import json

        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
