"""TLS between workers: a prefill worker serving over TLS, a decode worker pulling KV from it
with the CA as trust root, and mTLS refusing a client without a certificate."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from rpc.server import ServerOptions
from worker.config import DecodeWorkerConfig, PrefillWorkerConfig
from worker.server import start_decode_server, start_prefill_server

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make test certificates"
)

PROMPT = list(range(30, 70))
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "1", "-subj", "/CN=pdserve-test-ca", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "san.cnf",
                cwd=d)  # fmt: skip
    return d


def engine(model) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), kv_cache_memory=1 << 20))


def test_kv_pull_over_tls_and_mtls_refuses_anonymous_clients(tiny_llama, certs):
    ca = (certs / "ca.pem").read_bytes()

    async def main():
        p = await start_prefill_server(
            engine(tiny_llama),
            PrefillWorkerConfig(),
            ServerOptions(port=0, tls_cert=certs / "server.pem", tls_key=certs / "server.key"),
        )
        d = await start_decode_server(
            engine(tiny_llama),
            DecodeWorkerConfig(kv_transport="grpc", peer_tls_ca=certs / "ca.pem"),
            ServerOptions(
                port=0,
                tls_cert=certs / "server.pem",
                tls_key=certs / "server.key",
                tls_client_ca=certs / "ca.pem",
            ),
        )
        plain = grpc.ssl_channel_credentials(root_certificates=ca)
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(certs / "client.key").read_bytes(),
            certificate_chain=(certs / "client.pem").read_bytes(),
        )
        try:
            async with (
                grpc.aio.secure_channel(p.address, plain) as pc,
                grpc.aio.secure_channel(d.address, with_cert) as dc,
                grpc.aio.secure_channel(d.address, plain) as anonymous,
            ):
                reply = await worker_pb2_grpc.PrefillServiceStub(pc).Prefill(
                    worker_pb2.PrefillRequest(
                        transfer_id="tls-1", prompt_token_ids=PROMPT, sampling=GREEDY
                    ),
                    timeout=30,
                )
                req = worker_pb2.DecodeRequest(
                    request_id="tls-1", prompt_token_ids=PROMPT, sampling=GREEDY,
                    kv_handle=reply.handle,
                )  # fmt: skip
                chunks = [c async for c in worker_pb2_grpc.DecodeServiceStub(dc).Decode(req)]
                assert sum(len(c.token_ids) for c in chunks) == 6
                assert d.worker.importer.pulls_by_transport == {"grpc": 1}
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await worker_pb2_grpc.DecodeServiceStub(anonymous).GetLoad(
                        common_pb2.GetLoadRequest(), timeout=10
                    )
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused
        finally:
            await d.stop(drain_s=0)
            await p.stop(drain_s=0)

    asyncio.run(main())
