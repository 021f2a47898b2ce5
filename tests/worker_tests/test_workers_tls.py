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
    # Eager: these tests are about the wire, not the compiled forward.
    return LLMEngine(EngineConfig(model=str(model), kv_cache_memory=1 << 20, enforce_eager=True))


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


def test_gateway_dials_mtls_workers_with_the_cluster_credential(tiny_llama, certs):
    """Workers on mTLS that want the cluster credential: a gateway with the CA, a client
    certificate and the secret serves a disaggregated request; one lacking either is locked out
    (its workers unhealthy, 503) and nothing runs on the workers."""
    import httpx

    from gateway.config import GatewayConfig
    from gateway.server import GatewayServer
    from rpc.auth import ClusterSecret

    secret = ClusterSecret("tls-test-cluster-secret")
    mtls = ServerOptions(port=0, tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                         tls_client_ca=certs / "ca.pem", cluster_secret=secret)  # fmt: skip

    async def complete(config) -> httpx.Response:
        gateway = GatewayServer(config, log_level="warning")
        await gateway.start()
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": "tiny", "prompt": "hello " * 30, "max_tokens": 4,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                return await client.post(
                    f"http://127.0.0.1:{gateway.http_port}/v1/completions", json=body
                )
        finally:
            await gateway.stop()

    async def main():
        p = await start_prefill_server(
            engine(tiny_llama), PrefillWorkerConfig(cluster_secret=secret), mtls
        )
        d = await start_decode_server(
            engine(tiny_llama),
            DecodeWorkerConfig(kv_transport="grpc", peer_tls_ca=certs / "ca.pem",
                               peer_tls_cert=certs / "client.pem",
                               peer_tls_key=certs / "client.key", cluster_secret=secret),
            mtls,
        )  # fmt: skip
        base = dict(model_path=tiny_llama, prefill_addresses=(p.address,),
                    decode_addresses=(d.address,), served_model_names=("tiny",), http_port=0,
                    grpc_port=None, min_prefill_tokens=8)  # fmt: skip
        full = dict(worker_tls_ca=certs / "ca.pem", worker_tls_cert=certs / "client.pem",
                    worker_tls_key=certs / "client.key", cluster_secret=secret)  # fmt: skip
        try:
            ok = await complete(GatewayConfig(**base, **full))
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["completion_tokens"] == 4
            assert d.worker.importer.pulls_by_transport == {"grpc": 1}  # prefilled on p
            lacking = {
                "no cluster secret": ("cluster_secret",),
                "no client certificate": ("worker_tls_cert", "worker_tls_key"),
                "plaintext": ("worker_tls_ca", "worker_tls_cert", "worker_tls_key"),
            }
            for missing, drop in lacking.items():
                partial = {k: v for k, v in full.items() if k not in drop}
                refused = await complete(GatewayConfig(**base, **partial))
                assert refused.status_code == 503, (missing, refused.text)
            assert d.worker.importer.pulls_by_transport == {"grpc": 1}
        finally:
            await d.stop(drain_s=0)
            await p.stop(drain_s=0)

    asyncio.run(main())
