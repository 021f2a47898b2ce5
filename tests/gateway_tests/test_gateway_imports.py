"""At run time the gateway never loads torch, the engine or transformers: a fresh interpreter
builds a whole gateway (tokenizer, app, gRPC service) and we look at sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_gateway_fakes import build_tiny_model_folder

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import asyncio, json, sys
sys.path.insert(0, "tests")
import pdserve.client, pdserve.commands.gateway as cmd
from gateway.config import GatewayConfig
from gateway.server import GatewayServer

async def build():
    config = GatewayConfig(model_path=sys.argv[1], decode_addresses=("127.0.0.1:1",),
                           http_port=0, grpc_port=0)
    server = GatewayServer(config, log_level="warning")
    await server.start()
    await server.stop()

asyncio.run(build())
forbidden = ("torch", "engine", "transformers", "triton", "kvtransfer", "worker")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in forbidden)))
"""


def test_a_running_gateway_imports_no_torch_engine_or_transformers(tmp_path):
    folder = build_tiny_model_folder(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)],
        cwd=REPO,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
