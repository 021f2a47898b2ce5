"""Run a worker on one gRPC server: the engine loop and the services of its role.

prefill: PrefillService + KVTransferService (decode workers pull the leased blocks)
decode:  DecodeService (pulls KV from prefill workers, or prefills locally)
both:    all three, over one engine
"""

from __future__ import annotations

import logging

from engine.engine import LLMEngine
from kvtransfer.service import KVTransferServicer
from kvtransfer.service import add_to_server as add_kv_service
from protos.pdserve.v1 import kvtransfer_pb2, worker_pb2, worker_pb2_grpc
from rpc.server import RunningServer, ServerOptions, start_server
from worker.both import BothWorker
from worker.config import BothWorkerConfig, DecodeWorkerConfig, PrefillWorkerConfig
from worker.decode import DecodeWorker
from worker.prefill import PrefillWorker
from worker.servicer import DecodeServicer, PrefillServicer

log = logging.getLogger(__name__)


def _service(module, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name


class WorkerServer:
    """A started worker (in-process: used by tests and by `pdserve prefill|decode`)."""

    def __init__(
        self,
        worker: PrefillWorker | DecodeWorker | BothWorker,
        running: RunningServer,
        address: str,
        kv_servicer: KVTransferServicer | None = None,
    ) -> None:
        self.worker = worker
        self.running = running
        self.address = address  # prefill, both: the KV endpoint put in handles
        self.kv_servicer = kv_servicer

    @property
    def role(self) -> str:
        return self.worker.role

    async def stop(self, drain_s: float | None = None) -> None:
        """Graceful: health NOT_SERVING, drain, stop the server, free everything."""
        await self.running.set_serving(False)
        await self.worker.drain(self.worker.config.drain_timeout_s if drain_s is None else drain_s)
        await self.running.stop(grace_s=1.0)
        await self.worker.close()


async def start_prefill_server(
    engine: LLMEngine, config: PrefillWorkerConfig, options: ServerOptions
) -> WorkerServer:
    worker = PrefillWorker(engine, config)
    kv = KVTransferServicer(worker.exporter, transfer_delay_s=config.transfer_delay_ms / 1000)

    def register(server) -> list[str]:
        worker_pb2_grpc.add_PrefillServiceServicer_to_server(PrefillServicer(worker), server)
        add_kv_service(server, kv)
        return [
            _service(worker_pb2, "PrefillService"),
            _service(kvtransfer_pb2, "KVTransferService"),
        ]

    running = await start_server(options, register)
    worker.start(options.host, running.port)
    return WorkerServer(worker, running, worker.kv_endpoint, kv)


async def start_decode_server(
    engine: LLMEngine, config: DecodeWorkerConfig, options: ServerOptions
) -> WorkerServer:
    worker = DecodeWorker(engine, config)

    def register(server) -> list[str]:
        worker_pb2_grpc.add_DecodeServiceServicer_to_server(DecodeServicer(worker), server)
        return [_service(worker_pb2, "DecodeService")]

    running = await start_server(options, register)
    worker.start()
    return WorkerServer(worker, running, f"{options.host}:{running.port}")


async def start_both_server(
    engine: LLMEngine, config: BothWorkerConfig, options: ServerOptions
) -> WorkerServer:
    worker = BothWorker(engine, config)
    kv = KVTransferServicer(
        worker.prefill.exporter, transfer_delay_s=config.prefill.transfer_delay_ms / 1000
    )

    def register(server) -> list[str]:
        worker_pb2_grpc.add_PrefillServiceServicer_to_server(
            PrefillServicer(worker.prefill), server
        )
        worker_pb2_grpc.add_DecodeServiceServicer_to_server(DecodeServicer(worker.decode), server)
        add_kv_service(server, kv)
        return [
            _service(worker_pb2, "PrefillService"),
            _service(worker_pb2, "DecodeService"),
            _service(kvtransfer_pb2, "KVTransferService"),
        ]

    running = await start_server(options, register)
    worker.start(options.host, running.port)
    return WorkerServer(worker, running, worker.kv_endpoint, kv)


WorkerConfig = PrefillWorkerConfig | DecodeWorkerConfig | BothWorkerConfig


async def start_worker_server(
    engine: LLMEngine, config: WorkerConfig, options: ServerOptions
) -> WorkerServer:
    """The worker whose role the config names."""
    if isinstance(config, PrefillWorkerConfig):
        return await start_prefill_server(engine, config, options)
    if isinstance(config, BothWorkerConfig):
        return await start_both_server(engine, config, options)
    return await start_decode_server(engine, config, options)
