"""`pdserve gateway` flags -> GatewayConfig, and the config's own checks."""

from __future__ import annotations

import argparse

import pytest
from test_gateway_fakes import build_tiny_model_folder

from gateway.config import GatewayConfig
from pdserve.commands import gateway as cmd


def parse(argv):
    parser = argparse.ArgumentParser()
    cmd.add_parser(parser)
    return parser.parse_args(argv)


def test_flags_become_a_config(tmp_path, monkeypatch):
    folder = build_tiny_model_folder(tmp_path)
    monkeypatch.setenv(cmd.API_KEY_ENV, "from-env")
    args = parse(
        [
            "--model",
            str(folder),
            "--prefill",
            "127.0.0.1:1, 127.0.0.1:2",
            "--decode",
            "127.0.0.1:3",
            "--max-pending",
            "7",
            "--min-prefill-tokens",
            "0",
            "--grpc-port",
            "-1",
            "--served-model-name",
            "m",
        ]
    )
    config = cmd.config_from_args(args, cmd.resolve_model_folder(args.model))
    assert config.prefill_addresses == ("127.0.0.1:1", "127.0.0.1:2")
    assert config.decode_addresses == ("127.0.0.1:3",)
    assert (config.max_pending, config.min_prefill_tokens, config.grpc_port) == (7, 0, None)
    assert (config.api_key, config.model_name, config.host) == ("from-env", "m", "127.0.0.1")
    assert config.generation_config == "auto"  # vLLM's default
    args = parse(["--model", str(folder), "--decode", "127.0.0.1:3", "--api-key", "flag"])
    assert cmd.config_from_args(args, folder).api_key == "flag"
    args = parse(["--model", str(folder), "--decode", "127.0.0.1:3", "--generation-config", "vllm"])
    assert cmd.config_from_args(args, folder).generation_config == "vllm"


def test_a_bad_generation_config_stops_the_gateway_at_start_up(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "model")
    (folder / "generation_config.json").write_text('{"temperature": "hot"}')
    args = parse(["--model", str(folder), "--decode", "127.0.0.1:3", "--log-level", "error"])
    with pytest.raises(SystemExit, match="pdserve gateway: .*temperature must be a number"):
        cmd.run(args)
    args.generation_config = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match="neither 'auto', 'vllm' nor a folder"):
        cmd.run(args)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"decode_addresses": ()}, "decode worker"),
        ({"decode_addresses": ("nohost",)}, "HOST:PORT"),
        ({"prefill_addresses": ("h:1", "h:1")}, "twice"),
        ({"prefill_addresses": ("dns:svc",)}, "dns:NAME:PORT"),
        ({"decode_addresses": ("dns:svc:0",)}, "HOST:PORT"),
        ({"router": "random"}, "router must be one of"),
        ({"max_pending": 0}, "max_pending"),
        ({"api_key": ""}, "api_key"),
        ({"min_prefill_tokens": -1}, "min_prefill_tokens"),
    ],
)
def test_config_refuses_bad_values(tmp_path, change, message):
    values = {"model_path": tmp_path, "decode_addresses": ("127.0.0.1:1",), **change}
    with pytest.raises(ValueError, match=message):
        GatewayConfig(**values)
