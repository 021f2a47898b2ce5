"""One gateway process: the worker pool and its poller, the gRPC server and the HTTP server,
all on one asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from gateway.config import GatewayConfig
from gateway.core import GatewayCore
from gateway.grpc_service import start_grpc_server
from gateway.metrics import GatewayMetrics
from gateway.openai.app import build_app
from gateway.openai.slow_clients import timed_h11
from gateway.tokenizer import GatewayTokenizer
from gateway.worker_client import client_factory
from gateway.worker_pool import DECODE, WorkerPool
from rpc.server import RunningServer

log = logging.getLogger(__name__)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: GatewayServer.wait() owns SIGINT/SIGTERM and
    shuts the gRPC side down too (uvicorn would re-raise the signal and skip that)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayServer:
    """`await start()`, then `await wait()` (returns on SIGINT/SIGTERM) or `await stop()`."""

    def __init__(self, config: GatewayConfig, log_level: str = "info") -> None:
        self.config = config
        tokenizer = GatewayTokenizer(
            config.tokenizer_folder, config.chat_template, model_folder=config.model_path
        )
        self.pool = WorkerPool(
            config.prefill_addresses,
            config.decode_addresses,
            config.control_timeout_s,
            client_factory(config),
            router=config.router,
        )
        metrics = GatewayMetrics(self.pool, config.model_name)
        self.core = GatewayCore(config, tokenizer, self.pool, metrics)
        self.app = build_app(self.core)
        self._log_level = log_level
        self._uvicorn: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._grpc: RunningServer | None = None  # health NOT_SERVING without a decode worker
        self.http_port: int | None = None
        self.grpc_port: int | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        await self.pool.poll_once()
        if self.config.grpc_port is not None:
            self._grpc = await start_grpc_server(self.core, self.config.host, self.config.grpc_port)
            self.grpc_port = self._grpc.port
        self._poller = asyncio.create_task(self._poll_forever())
        await self._start_http()
        log.info(
            "gateway serving %s: HTTP %s:%s, gRPC port %s",
            self.config.model_name,
            self.config.host,
            self.http_port,
            self.grpc_port,
        )

    async def _poll_forever(self) -> None:
        """Ask workers for their load; mirror 'a decode worker is healthy' in grpc.health.v1."""
        while True:
            if self._grpc is not None:
                await self._grpc.set_serving(bool(self.pool.healthy(DECODE)))
            await asyncio.sleep(self.config.load_interval_s)
            await self.pool.poll_once()

    async def _start_http(self) -> None:
        config = uvicorn.Config(
            self.app,
            host=self.config.host,
            port=self.config.http_port,
            log_level=self._log_level,
            lifespan="off",
            timeout_graceful_shutdown=5,
            http=timed_h11(self.config.header_timeout_s, self.config.max_connections),
        )
        self._uvicorn = _HttpServer(config)
        self._http_task = asyncio.create_task(self._uvicorn.serve())
        while not self._uvicorn.started:
            if self._http_task.done():
                await self._http_task  # raises what stopped it
                raise OSError(f"the HTTP server did not start on port {self.config.http_port}")
            await asyncio.sleep(0.02)
        self.http_port = self._uvicorn.servers[0].sockets[0].getsockname()[1]

    async def wait(self) -> None:
        """Serve until SIGINT/SIGTERM, then shut down cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_exit)
        if self._http_task is not None:
            await self._http_task
        await self.stop()

    def _request_exit(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    async def stop(self) -> None:
        if self._uvicorn is not None and self._http_task is not None:
            self._uvicorn.should_exit = True
            await asyncio.gather(self._http_task, return_exceptions=True)  # failed or not
        if self._grpc is not None:
            await self._grpc.server.stop(grace=2)
        if self._poller is not None:
            self._poller.cancel()
        await self.core.drain_background()
        self.core.close()
        await self.pool.close()
        self._uvicorn = self._http_task = self._grpc = self._poller = None
