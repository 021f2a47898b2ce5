"""Gateway configuration: one dataclass, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.limits import MAX_LOGPROBS
from gateway.discovery import parse_entries
from gateway.router import DEFAULT_ROUTER, ROUTER_NAMES
from gateway.tool_parsers import TOOL_PARSERS
from rpc.auth import ClusterSecret


@dataclass(slots=True, frozen=True)
class GatewayConfig:
    model_path: Path  # HF folder: tokenizer.json, tokenizer_config.json, config.json
    # HOST:PORT or dns:NAME:PORT (every address behind NAME, re-resolved on every poll)
    prefill_addresses: tuple[str, ...] = ()
    decode_addresses: tuple[str, ...] = ()
    router: str = DEFAULT_ROUTER  # round-robin | least-loaded | kv-aware
    # Every name requests may give as `model` (all listed by /v1/models); responses carry the
    # first. Empty: the model folder's name. A single str is accepted too.
    served_model_names: tuple[str, ...] = ()
    tokenizer_path: Path | None = None  # tokenizer files and chat template; None: model_path
    # Sampling defaults of requests that leave a field unset (vLLM's --generation-config):
    # "auto" the model folder's generation_config.json, "vllm" none, or a folder holding one
    generation_config: str = "auto"
    max_logprobs: int = MAX_LOGPROBS  # cap on logprobs / top_logprobs (400 above it)
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int | None = 50051  # None: no gRPC front door
    api_key: str | None = None  # Bearer token required on /v1/* when set
    chat_template: str | None = None  # a template file or the template text
    max_model_len: int | None = None  # None: min(model's max positions, 4096), the engine's
    max_pending: int = 256  # requests in flight before new ones get 429/RESOURCE_EXHAUSTED
    min_prefill_tokens: int = 16  # shorter prompts are prefilled on the decode worker
    max_n: int = 16
    max_stop_strings: int = 16
    max_body_bytes: int = 8 * 2**20  # larger HTTP bodies get 413
    max_prompt_bytes: int = 2**20  # longer prompt text gets 400 before it is tokenized
    header_timeout_s: float = 10.0  # a request head not complete by then: connection closed
    body_timeout_s: float = 30.0  # a body not complete this long after its head: 408
    max_connections: int = 1024  # HTTP connections open at once; more are closed on accept
    max_header_count: int = 100  # HTTP requests with more headers get 431
    max_header_bytes: int = 32 * 2**10  # ... and with more header bytes in all
    prefill_timeout_s: float = 300.0  # deadline of one Prefill call
    prefill_progress_s: float = 1.0  # Prefill unanswered this long: is the worker alive? (dispatch)
    request_timeout_s: float = 3600.0  # deadline of a whole request (every hop within it)
    control_timeout_s: float = 5.0  # Abort, Release, GetLoad
    load_interval_s: float = 1.0  # how often workers are asked for their load
    retry_after_s: int = 1  # Retry-After on 429
    tool_call_parser: str | None = None  # "hermes" | "llama3_json": parses tool_choice "auto"
    enable_auto_tool_choice: bool = False  # as vLLM: "auto" needs this and a parser
    cluster_secret: ClusterSecret | None = None  # sent on every worker call (rpc/auth.py)
    worker_tls_ca: Path | None = None  # dial workers over TLS, trusting this CA (PEM)
    worker_tls_cert: Path | None = None  # ... and present this client certificate (mTLS)
    worker_tls_key: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_path", Path(self.model_path))  # accept a str too
        if self.tokenizer_path is not None:
            object.__setattr__(self, "tokenizer_path", Path(self.tokenizer_path))
        names = self.served_model_names
        names = (names,) if isinstance(names, str) else tuple(names)
        object.__setattr__(self, "served_model_names", tuple(n for n in names if n))
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"max_logprobs must be in [0, {MAX_LOGPROBS}] (the engine's limit), "
                f"got {self.max_logprobs}"
            )
        if not self.decode_addresses:
            raise ValueError("at least one decode worker address is required (--decode)")
        parse_entries(self.prefill_addresses, "--prefill")
        parse_entries(self.decode_addresses, "--decode")
        if self.router not in ROUTER_NAMES:
            raise ValueError(
                f"router must be one of {', '.join(ROUTER_NAMES)}, got {self.router!r}"
            )
        self._check_positive()
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}, got {self.tool_call_parser!r}"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if (self.worker_tls_cert is None) != (self.worker_tls_key is None):
            raise ValueError("--worker-tls-cert and --worker-tls-key go together")
        if self.worker_tls_cert is not None and self.worker_tls_ca is None:
            raise ValueError("--worker-tls-cert (mTLS) needs --worker-tls-ca")
        object.__setattr__(self, "generation_config", str(self.generation_config))  # a Path too
        if not self.generation_config:
            raise ValueError("generation_config must be auto, vllm or a folder, got ''")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (omit it to disable auth)")

    def _check_positive(self) -> None:
        for name in (
            "max_pending",
            "max_n",
            "max_stop_strings",
            "max_body_bytes",
            "max_prompt_bytes",
            "max_connections",
            "max_header_count",
            "max_header_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "prefill_timeout_s",
            "prefill_progress_s",
            "request_timeout_s",
            "control_timeout_s",
            "load_interval_s",
            "header_timeout_s",
            "body_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.min_prefill_tokens < 0:
            raise ValueError(f"min_prefill_tokens must be >= 0, got {self.min_prefill_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {port}")

    @property
    def model_names(self) -> tuple[str, ...]:
        """What requests may name as `model`; the first is the one responses carry."""
        return self.served_model_names or (self.model_path.name,)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def tokenizer_folder(self) -> Path:
        return self.tokenizer_path or self.model_path
