"""`pdserve gateway`: the gRPC front door and OpenAI routes in front of prefill/decode workers.

This module resolves the model folder (the default model lives in the engine's cache) and hands
the gateway a plain path, so the gateway package itself never imports the engine or torch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from rpc.auth import add_cluster_secret_arg, require_cluster_secret
from rpc.sampling import add_max_logprobs_arg

API_KEY_ENV = "PDSERVE_API_KEY"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def add_parser(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workers")
    g.add_argument(
        "--prefill",
        default="",
        help="prefill workers, comma-separated: HOST:PORT, or dns:NAME:PORT for every address "
        "NAME resolves to (re-resolved on every poll, e.g. a headless Kubernetes Service)",
    )
    g.add_argument(
        "--decode", required=True, help="decode workers, as --prefill (at least one entry)"
    )
    g.add_argument(
        "--router",
        default="kv-aware",
        choices=("round-robin", "least-loaded", "kv-aware"),
        help="how a worker is chosen: kv-aware sends a prefill where its prefix is cached "
        "(weighted by load) and a decode to the least-loaded worker with KV room",
    )
    g.add_argument(
        "--min-prefill-tokens",
        type=int,
        default=16,
        help="prompts shorter than this are prefilled on the decode worker",
    )
    g.add_argument("--prefill-timeout", type=float, default=300.0, help="seconds per Prefill call")
    g.add_argument("--prefill-progress-timeout", type=float, default=1.0,
                   help="a Prefill unanswered this long, whose worker then cannot answer GetLoad "
                   "within as long, is abandoned and prefilled on the decode worker")  # fmt: skip
    g.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    g.add_argument(
        "--load-interval", type=float, default=1.0, help="seconds between worker load/health polls"
    )
    m = parser.add_argument_group("model")
    m.add_argument(
        "--model",
        default=None,
        help="HF model folder for the tokenizer and chat template (default: the "
        "default model's converted folder)",
    )
    m.add_argument("--tokenizer", default=None,
                   help="HF folder with the tokenizer files and chat template (default: --model)")  # fmt: skip
    add_served_name_arg(m)
    add_generation_config_arg(m)
    add_max_logprobs_arg(m)
    m.add_argument("--chat-template", default=None, help="a template file or the template text")
    add_tool_args(m)
    m.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default: min(model's max positions, 4096), as workers)",
    )
    s = parser.add_argument_group("serving")
    s.add_argument("--host", default="127.0.0.1", help="bind address (HTTP and gRPC)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--grpc-port", type=int, default=50051, help="gRPC port; -1 disables gRPC")
    s.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1/* (or set {API_KEY_ENV})",
    )
    s.add_argument(
        "--max-pending",
        type=int,
        default=256,
        help="requests in flight before new ones get 429 / RESOURCE_EXHAUSTED",
    )
    s.add_argument("--max-n", type=int, default=16)
    s.add_argument("--max-prompt-bytes", type=int, default=2**20,
                   help="longer prompt text gets 400 before it is tokenized")  # fmt: skip
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request head to arrive, then the connection is closed")  # fmt: skip
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds for a request body to arrive after its head, then 408")  # fmt: skip
    s.add_argument("--max-connections", type=int, default=1024,
                   help="HTTP connections open at once; more are closed when accepted")  # fmt: skip
    w = parser.add_argument_group("trust between services")
    add_cluster_secret_arg(w)
    w.add_argument("--worker-tls-ca", type=Path, default=None,
                   help="dial workers over TLS, trusting this CA (PEM)")  # fmt: skip
    w.add_argument("--worker-tls-cert", type=Path, default=None,
                   help="client certificate (PEM) for workers that require mTLS")  # fmt: skip
    w.add_argument("--worker-tls-key", type=Path, default=None, help="its private key (PEM)")
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS)


def add_served_name_arg(group) -> None:
    group.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model ids in the API: requests may name any, /v1/models lists all, responses "
        "carry the first (default: the model folder's name)",
    )


def add_generation_config_arg(group) -> None:
    group.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|vllm|FOLDER",
        help="sampling defaults of requests that leave temperature, top_p, top_k, min_p, "
        "repetition_penalty or max_tokens unset, as vLLM: auto (default) takes them from the "
        "model folder's generation_config.json, vllm ignores the file, a FOLDER reads its "
        "generation_config.json",
    )


def add_tool_args(group) -> None:
    group.add_argument(
        "--tool-call-parser",
        default=None,
        choices=["hermes", "llama3_json"],
        help="how tool calls are read from the text (tool_choice auto), as vLLM",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide when to call tools (tool_choice "auto"; needs a parser)',
    )


def resolve_model_folder(model: str | None) -> Path:
    """An existing folder as is; otherwise the engine resolves it (the default model)."""
    if model is not None and Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    from pdserve.default_model import resolve_model

    return resolve_model(model)


def resolve_tokenizer_folder(tokenizer: str | None) -> Path | None:
    if tokenizer is None:
        return None
    folder = Path(tokenizer).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--tokenizer {tokenizer!r} is not a folder")
    return folder.resolve()


def config_from_args(args: argparse.Namespace, model_path: Path):
    from gateway.config import GatewayConfig

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        secret = require_cluster_secret(args.cluster_secret_file, os.environ)
    except OSError as exc:
        raise ValueError(f"cannot read --cluster-secret-file: {exc}") from None
    return GatewayConfig(
        cluster_secret=secret,
        worker_tls_ca=args.worker_tls_ca,
        worker_tls_cert=args.worker_tls_cert,
        worker_tls_key=args.worker_tls_key,
        model_path=model_path,
        prefill_addresses=_addresses(args.prefill),
        decode_addresses=_addresses(args.decode),
        router=args.router,
        served_model_names=tuple(args.served_model_name or ()),
        tokenizer_path=resolve_tokenizer_folder(args.tokenizer),
        generation_config=args.generation_config,
        max_logprobs=args.max_logprobs,
        host=args.host,
        http_port=args.port,
        grpc_port=None if args.grpc_port < 0 else args.grpc_port,
        api_key=api_key,
        chat_template=args.chat_template,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        max_model_len=args.max_model_len,
        max_pending=args.max_pending,
        min_prefill_tokens=args.min_prefill_tokens,
        max_n=args.max_n,
        max_prompt_bytes=args.max_prompt_bytes,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
        prefill_timeout_s=args.prefill_timeout,
        prefill_progress_s=args.prefill_progress_timeout,
        request_timeout_s=args.request_timeout,
        load_interval_s=args.load_interval,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args, resolve_model_folder(args.model))
        asyncio.run(_serve(config, args.log_level))
    except ValueError as exc:  # bad flags, model folder or chat template
        raise SystemExit(f"pdserve gateway: {exc}") from None
    return 0


async def _serve(config, log_level: str) -> None:
    from gateway.server import GatewayServer

    server = GatewayServer(config, log_level)
    await server.start()
    # One line on stdout for launchers and tests that start us with port 0.
    grpc_part = f", grpc {config.host}:{server.grpc_port}" if server.grpc_port else ""
    print(f"gateway listening on http {config.host}:{server.http_port}{grpc_part}", flush=True)
    await server.wait()


def _addresses(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
