"""The FastAPI application: OpenAI routes plus health, metrics, tokenizer and version routes."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.core import GatewayCore
from gateway.errors import invalid
from gateway.openai.chat import create_chat_completion
from gateway.openai.common import check_model
from gateway.openai.completions import create_completion
from gateway.openai.errors import install_error_handlers
from gateway.openai.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
)
from gateway.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_prompt,
)
from gateway.openai.slow_clients import BodyTimeoutMiddleware
from gateway.openai.streaming import ClientDisconnected
from gateway.schema import ChatPrompt, TextPrompt
from gateway.validation import check_token_ids
from gateway.version import VERSION
from gateway.worker_pool import DECODE, PREFILL


def build_app(core: GatewayCore) -> FastAPI:
    app = FastAPI(title="pdserve gateway", version=VERSION, docs_url=None, redoc_url=None)
    install_error_handlers(app, core.config.retry_after_s)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    _add_generation_routes(app, core)
    _add_info_routes(app, core)
    _add_tokenizer_routes(app, core)
    if core.config.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=core.config.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=core.config.max_body_bytes)
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=core.config.body_timeout_s)
    app.add_middleware(
        HeaderLimitMiddleware,
        max_count=core.config.max_header_count,
        max_bytes=core.config.max_header_bytes,
    )  # outermost: checked first
    return app


def _add_generation_routes(app: FastAPI, core: GatewayCore) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(core, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(core, body, request)


def _add_info_routes(app: FastAPI, core: GatewayCore) -> None:
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "pdserve",
                "root": str(core.config.model_path),
                "max_model_len": core.max_model_len,
            }
            for name in core.config.model_names
        ]
        return {"object": "list", "data": cards}

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when a decode worker is healthy (decode workers can also prefill), else 503."""
        body = {role: _worker_states(core, role) for role in (PREFILL, DECODE)}
        ok = bool(core.pool.healthy(DECODE))
        degraded = ok and bool(core.pool.of_role(PREFILL)) and not core.pool.healthy(PREFILL)
        body["status"] = "degraded" if degraded else ("ok" if ok else "unavailable")
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(core.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}


def _add_tokenizer_routes(app: FastAPI, core: GatewayCore) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(core, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise invalid("give exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            messages = tuple(m.to_chat_message() for m in body.messages)
            if not messages:
                raise invalid("messages must not be empty", "messages")
            prompt: TextPrompt | ChatPrompt = chat_prompt(body, messages)
        else:
            prompt = TextPrompt(body.prompt or "", body.add_special_tokens)
        tokens = await core.tokenize_off_loop(prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": core.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        check_model(core, body.model)
        check_token_ids(body.tokens, core.tokenizer.vocab_size, "tokens")
        return {"prompt": core.tokenizer.decode(body.tokens, skip_special_tokens=False)}


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; the request was aborted on the workers


def _worker_states(core: GatewayCore, role: str) -> list[dict[str, Any]]:
    return [
        {
            "address": w.address,
            "healthy": w.healthy,
            "error": w.last_error,
            "queue_depth": w.load.queue_depth if w.load else None,
            "kv_cache_usage": w.load.kv_cache_usage if w.load else None,
            "indexed_blocks": len(core.pool.index.hashes(w.address)),
        }
        for w in core.pool.of_role(role)
    ]
