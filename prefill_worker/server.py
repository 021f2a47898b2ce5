"""Run a prefill worker: engine loop + PrefillService + KVTransferService on one gRPC server."""

from __future__ import annotations

import logging

from engine.engine import LLMEngine
from kvtransfer.service import KVTransferServicer
from kvtransfer.service import add_to_server as add_kv_service
from prefill_worker.config import PrefillWorkerConfig
from prefill_worker.grpc_server import RunningServer, ServerOptions, start_server
from prefill_worker.servicer import PrefillServicer
from prefill_worker.worker import PrefillWorker
from protos.pdserve.v1 import kvtransfer_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class PrefillServer:
    """A started prefill worker (in-process: used by tests and by `pdserve prefill`)."""

    def __init__(self, worker: PrefillWorker, running: RunningServer, kv: KVTransferServicer):
        self.worker = worker
        self.running = running
        self.kv_servicer = kv

    @property
    def address(self) -> str:
        return self.worker.kv_endpoint

    async def stop(self, drain_s: float | None = None) -> None:
        """Graceful: health NOT_SERVING, drain, stop the server, free everything."""
        await self.running.set_serving(False)
        await self.worker.drain(self.worker.config.drain_timeout_s if drain_s is None else drain_s)
        await self.running.stop(grace_s=1.0)
        self.worker.close()


async def start_prefill_server(
    engine: LLMEngine, config: PrefillWorkerConfig, options: ServerOptions
) -> PrefillServer:
    worker = PrefillWorker(engine, config)
    kv = KVTransferServicer(worker.exporter, transfer_delay_s=config.transfer_delay_ms / 1000)

    def register(server) -> list[str]:
        worker_pb2_grpc.add_PrefillServiceServicer_to_server(PrefillServicer(worker), server)
        add_kv_service(server, kv)
        return [
            worker_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name,
            kvtransfer_pb2.DESCRIPTOR.services_by_name["KVTransferService"].full_name,
        ]

    running = await start_server(options, register)
    worker.start(options.host, running.port)
    return PrefillServer(worker, running, kv)
