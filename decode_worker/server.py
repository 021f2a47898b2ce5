"""Run a decode worker: engine loop + DecodeService on one gRPC server."""

from __future__ import annotations

from decode_worker.config import DecodeWorkerConfig
from decode_worker.servicer import DecodeServicer
from decode_worker.worker import DecodeWorker
from engine.engine import LLMEngine
from prefill_worker.grpc_server import RunningServer, ServerOptions, start_server
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc


class DecodeServer:
    def __init__(self, worker: DecodeWorker, running: RunningServer, host: str) -> None:
        self.worker = worker
        self.running = running
        self.address = f"{host}:{running.port}"

    async def stop(self, drain_s: float | None = None) -> None:
        """Graceful: health NOT_SERVING, drain the streams, stop the server and the engine."""
        await self.running.set_serving(False)
        await self.worker.drain(self.worker.config.drain_timeout_s if drain_s is None else drain_s)
        await self.running.stop(grace_s=1.0)
        await self.worker.close()


async def start_decode_server(
    engine: LLMEngine, config: DecodeWorkerConfig, options: ServerOptions
) -> DecodeServer:
    worker = DecodeWorker(engine, config)

    def register(server) -> list[str]:
        worker_pb2_grpc.add_DecodeServiceServicer_to_server(DecodeServicer(worker), server)
        return [worker_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name]

    running = await start_server(options, register)
    worker.start()
    return DecodeServer(worker, running, options.host)
