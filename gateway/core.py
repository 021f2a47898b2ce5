"""The gateway core: admission, tokenization, validation, and one `RequestRun` per request.

Transport-neutral: the gRPC servicer and the OpenAI routes both call `GatewayCore.open()` and
iterate the run. `open()` does everything that can fail cheaply and synchronously (so the HTTP
layer can still answer with a status code): the bounded-queue check first, before any
tokenizing, then health, parameters, the prompt and the context length.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from contract.generation_config import describe
from gateway.config import GatewayConfig
from gateway.dispatch import DispatchSettings
from gateway.errors import ErrorKind, GatewayError, invalid
from gateway.metrics import GatewayMetrics
from gateway.request_run import RequestRun
from gateway.sampling_defaults import SamplingDefaults
from gateway.schema import ChatPrompt, GenerateRequest, Prompt, TextPrompt, TokenPrompt
from gateway.tokenizer import ChatTemplateError, GatewayTokenizer
from gateway.validation import (
    Limits,
    check_n,
    check_text,
    check_token_ids,
    resolve_max_tokens,
    validate_params,
)
from gateway.worker_pool import DECODE, WorkerPool

log = logging.getLogger(__name__)
MAX_REQUEST_ID_CHARS = 256


class GatewayCore:
    def __init__(
        self,
        config: GatewayConfig,
        tokenizer: GatewayTokenizer,
        pool: WorkerPool,
        metrics: GatewayMetrics,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pool = pool
        self.metrics = metrics
        self.max_model_len = config.max_model_len or tokenizer.default_max_model_len()
        self.limits = Limits(
            vocab_size=tokenizer.vocab_size,
            max_model_len=self.max_model_len,
            max_n=config.max_n,
            max_logprobs=config.max_logprobs,
            max_stop_strings=config.max_stop_strings,
        )
        # What unset sampling fields become on both front doors (--generation-config)
        self.sampling_defaults = SamplingDefaults.load(
            config.generation_config, config.model_path, self.limits
        )
        log.info(
            describe(config.generation_config, config.model_path, self.sampling_defaults.values)
        )
        self.dispatch_settings = DispatchSettings(
            min_prefill_tokens=config.min_prefill_tokens,
            prefill_timeout_s=config.prefill_timeout_s,
            prefill_progress_s=config.prefill_progress_s,
            control_timeout_s=config.control_timeout_s,
        )
        self._runs: dict[str, RequestRun] = {}
        self._opening: dict[str, int] = {}  # request id -> sequences, admitted, being tokenized
        self._background: set[asyncio.Task[Any]] = set()
        # Tokenizing and templating run here, off the event loop (one thread: HF tokenizers
        # are not safe to share between threads that encode at once).
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    @property
    def num_in_flight(self) -> int:
        return len(self._runs)

    @property
    def num_sequences(self) -> int:
        """Sequences in flight: every choice of every request (n each)."""
        return sum(run.params.n for run in self._runs.values()) + sum(self._opening.values())

    def check_capacity(self, sequences: int) -> None:
        """OVERLOADED unless `sequences` more fit under --max-pending. Admission counts
        sequences, not requests: a request with n choices (or a list of prompts, each with n)
        takes n slots per prompt."""
        in_flight = self.num_sequences
        if in_flight + sequences <= self.config.max_pending:
            return
        self.metrics.failure.labels(ErrorKind.OVERLOADED.value).inc()
        if sequences > self.config.max_pending:
            message = (
                f"this request fans out to {sequences} sequences (prompts x n); the server "
                f"admits at most {self.config.max_pending} at a time"
            )
        else:
            message = f"the server is busy ({in_flight} sequences in flight); retry later"
        raise GatewayError(ErrorKind.OVERLOADED, message)

    async def open(self, request: GenerateRequest) -> RequestRun:
        """Admit, tokenize and check one request; raises GatewayError before anything runs.
        Its sequences count toward --max-pending from admission on, tokenizing included."""
        check_n(request.params, self.limits)
        self.check_capacity(request.params.n)
        if not self.pool.healthy(DECODE):
            raise GatewayError(ErrorKind.UNAVAILABLE, "no healthy decode worker")
        request_id = self._new_request_id(request.request_id)
        validate_params(request.params, self.limits)
        self._opening[request_id] = request.params.n
        try:
            prompt_ids = await self.tokenize_off_loop(request.prompt)
        finally:
            del self._opening[request_id]
        prompt_ids = self._truncate(prompt_ids, request.truncate_prompt_tokens)
        max_tokens = resolve_max_tokens(
            len(prompt_ids),
            request.params.max_tokens,
            self.max_model_len,
            self.sampling_defaults.max_tokens,
        )
        timeout = self.config.request_timeout_s
        if request.timeout_s is not None:
            timeout = min(timeout, request.timeout_s)
        run = RequestRun(
            self,
            request_id,
            prompt_ids,
            request.params,
            max_tokens,
            deadline=time.monotonic() + timeout,
        )
        self._runs[request_id] = run
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return run

    def _truncate(self, prompt_ids: list[int], keep: int | None) -> list[int]:
        """vLLM's truncate_prompt_tokens: the last `keep` tokens (-1: as many as the context
        holds); the rest is cut from the left."""
        if keep is None:
            return prompt_ids
        if keep == -1:
            keep = self.max_model_len
        if not 1 <= keep <= self.max_model_len:
            raise invalid(
                f"truncate_prompt_tokens must be -1 or in [1, {self.max_model_len}] "
                f"(the context length), got {keep}",
                "truncate_prompt_tokens",
            )
        return prompt_ids[-keep:]

    def abort(self, request_id: str) -> bool:
        """Abort a request in flight (its stream ends with finish reason "abort")."""
        run = self._runs.get(request_id)
        if run is None:
            return False
        run.abort()
        return True

    async def tokenize_off_loop(self, prompt: Prompt) -> list[int]:
        """`tokenize` on the tokenizer thread, after the byte cap (checked here, cheaply)."""
        self.check_prompt_bytes(prompt)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, self.tokenize, prompt)

    def check_prompt_bytes(self, prompt: Prompt) -> None:
        if isinstance(prompt, TokenPrompt):
            return
        if isinstance(prompt, TextPrompt):
            size, param = len(prompt.text.encode("utf-8", "surrogatepass")), "prompt"
        else:
            size = sum(len(m.content.encode("utf-8", "surrogatepass")) for m in prompt.messages)
            param = "messages"
        limit = self.config.max_prompt_bytes
        if size > limit:
            raise invalid(
                f"the prompt is {size} bytes of text; at most {limit} are tokenized "
                f"(--max-prompt-bytes)",
                param,
            )

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Prompt -> token ids, checked: valid text, known ids, not empty. Blocking: on the
        event loop use `tokenize_off_loop`."""
        if isinstance(prompt, TokenPrompt):
            ids = list(prompt.token_ids)
            check_token_ids(ids, self.tokenizer.vocab_size, "prompt")
        elif isinstance(prompt, TextPrompt):
            check_text(prompt.text, "prompt")
            ids = (
                self.tokenizer.encode(prompt.text, prompt.add_special_tokens) if prompt.text else []
            )
        else:
            ids = self.tokenizer.encode(self.render_chat(prompt), add_special_tokens=False)
        if not ids:
            raise invalid(
                "the prompt is empty",
                "prompt" if not isinstance(prompt, ChatPrompt) else "messages",
            )
        return ids

    def render_chat(self, prompt: ChatPrompt) -> str:
        if not prompt.messages:
            raise invalid("messages must not be empty", "messages")
        for message in prompt.messages:
            check_text(message.content, "messages")
            check_text(message.role, "messages")
        try:
            return self.tokenizer.apply_chat_template(
                prompt.messages,
                prompt.add_generation_prompt,
                prompt.tools,
                continue_final_message=prompt.continue_final_message,
                template_kwargs=dict(prompt.template_kwargs),
            )
        except ChatTemplateError as exc:
            raise invalid(str(exc), exc.param) from exc

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a clean-up call in the background; it survives the request's cancellation."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def drain_background(self) -> None:
        """Wait for clean-up calls still in flight (used at shutdown and by tests)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def forget(self, run: RequestRun) -> None:
        self._runs.pop(run.request_id, None)

    def _new_request_id(self, wanted: str | None) -> str:
        if not wanted:
            return f"req-{uuid.uuid4().hex}"
        check_text(wanted, "request_id")
        if len(wanted) > MAX_REQUEST_ID_CHARS:  # it is echoed in every reply and worker log line
            raise invalid(
                f"request_id is {len(wanted)} characters long; at most {MAX_REQUEST_ID_CHARS}",
                "request_id",
            )
        if wanted in self._runs or wanted in self._opening:
            raise invalid(f"request_id {wanted!r} is already in flight", "request_id")
        return wanted
