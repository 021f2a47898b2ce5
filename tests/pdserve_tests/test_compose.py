"""compose.yaml, the Dockerfile and the Prometheus/Grafana files agree with the real CLI.

No Docker engine runs here, so each pdserve service's shell command is run through `sh` with a
stand-in `pdserve` (it records its argv) and the recorded command line is parsed by the real
`pdserve` parser; `pdserve <cmd> --help` runs for real.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pdserve.cli import build_parser
from pdserve.launcher import DECODE_PORT, GATEWAY_GRPC_PORT, GATEWAY_HTTP_PORT, PREFILL_PORT

ROOT = Path(__file__).resolve().parents[2]
PDSERVE = ROOT / ".venv" / "bin" / "pdserve"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pdserve.json"
PDSERVE_SERVICES = {"model": "convert", "prefill": "prefill", "decode": "decode",
                    "gateway": "gateway"}  # fmt: skip
METRIC = re.compile(r"pdserve:[A-Za-z0-9_:]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
CONTAINER_IP = "10.9.0.7"
RESOLVED = {"prefill:50061": "10.9.0.2:50061", "decode:50071": "10.9.0.3:50071,10.9.0.4:50071"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def shell_words(command: list[str] | str) -> list[str]:
    """A compose command with compose's `$$` escape undone (what the container receives)."""
    words = command if isinstance(command, list) else command.split()
    return [w.replace("$$", "$") for w in words]


def stub_bin(tmp: Path) -> Path:
    """`pdserve` records its argv; `hostname -i` and the resolve helper give fixed answers."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        "pdserve": f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {tmp}/argv\n',
        "hostname": f'#!/bin/sh\necho "{CONTAINER_IP} fd00::7"\n',
        "python": "#!/bin/sh\ncase \"$*\" in\n" + "".join(
            f'  *"resolve {k}") echo "{v}" ;;\n' for k, v in RESOLVED.items()
        ) + '  *) echo "unexpected python call: $*" >&2; exit 9 ;;\nesac\n',
    }  # fmt: skip
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def container_argv(service: dict, tmp: Path, env: dict[str, str]) -> list[str]:
    """Runs the service's command with stand-ins; returns what `pdserve` was called with."""
    words = shell_words(service["command"])
    path = f"{stub_bin(tmp)}:{os.environ['PATH']}"
    full_env = {"PATH": path, **env}
    if words[0] == "sh":
        done = subprocess.run(words, env=full_env, capture_output=True, text=True, timeout=30)
    else:
        done = subprocess.run(["sh", "-c", 'exec "$@"', "sh", *words], env=full_env,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return (tmp / "argv").read_text().splitlines()


def expand_defaults(text: str) -> str:
    """Compose's ${VAR:-default} with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def service_env(compose: dict, name: str, model: Path, **extra: str) -> dict[str, str]:
    """The service's environment as the container sees it with only PDSERVE_MODEL set outside
    (pointing at a folder that holds a finished model, so the wait loops end)."""
    for marker in ("config.json", "tokenizer.json"):
        model.mkdir(exist_ok=True)
        (model / marker).write_text("{}")
    names = compose["services"][name].get("environment") or []
    assert all(isinstance(n, str) and "=" not in n for n in names), "pass-through names only"
    return {"PDSERVE_MODEL": str(model), **extra}


def test_compose_is_portable(compose: dict) -> None:
    """docker-compose 1.29 rejects a top-level `name:`; podman-compose 1.0 passes `${X:-}`
    (an empty default) through literally."""
    lines = (ROOT / "compose.yaml").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert "name" not in compose
    assert not re.search(r"\$\{\w+:-\}", text.replace("$${", "#{"))


def parse(command: str, args: list[str]):  # noqa: ANN201
    return build_parser([command]).parse_args([command, *args])


def test_compose_has_the_services_and_a_model_volume(compose: dict, tmp_path) -> None:
    assert set(compose["services"]) == {*PDSERVE_SERVICES, "prometheus", "grafana"}
    mount = "model-cache:/home/pdserve/.cache/pdserve"
    for name in PDSERVE_SERVICES:
        assert mount in compose["services"][name]["volumes"], name
    default = re.search(
        r"PDSERVE_MODEL:-([^}]+)\}", " ".join(compose["services"]["prefill"]["command"])
    )
    assert default and default.group(1).startswith(mount.split(":")[1] + "/")
    assert "model-cache" in compose["volumes"]


@pytest.mark.parametrize("service", sorted(PDSERVE_SERVICES))
def test_service_command_is_a_real_pdserve_subcommand(
    compose: dict, service: str, tmp_path
) -> None:
    extra = "--max-num-seqs 8" if service in ("prefill", "decode") else "--log-level debug"
    env = service_env(
        compose, service, tmp_path / "m", PDSERVE_WORKER_ARGS=extra, PDSERVE_GATEWAY_ARGS=extra
    )
    argv = container_argv(compose["services"][service], tmp_path, env)
    assert argv[0] == PDSERVE_SERVICES[service]
    helped = subprocess.run([str(PDSERVE), argv[0], "--help"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    parse(argv[0], argv[1:])  # every flag the service passes exists (argparse exits otherwise)


def test_worker_commands_agree_with_the_cli_defaults(compose: dict, tmp_path) -> None:
    for name, port in (("prefill", PREFILL_PORT), ("decode", DECODE_PORT)):
        env = service_env(compose, name, tmp_path / "m", PDSERVE_WORKER_ARGS="--max-num-seqs 8")
        args = parse(name, container_argv(compose["services"][name], tmp_path, env)[1:])
        assert parse(name, []).port == port == args.port, name
        assert args.host == "0.0.0.0" and args.max_num_seqs == 8
        assert args.model == env["PDSERVE_MODEL"]
        assert compose["services"][name]["expose"] == [str(port)]
        probe = compose["services"][name]["healthcheck"]["test"]
        assert probe == ["CMD", "python", "-m", "pdserve.launcher", "probe",
                         f"grpc://127.0.0.1:{port}"]  # fmt: skip
    env = service_env(compose, "prefill", tmp_path / "m")
    args = parse("prefill", container_argv(compose["services"]["prefill"], tmp_path, env)[1:])
    assert args.advertise_address == f"{CONTAINER_IP}:{PREFILL_PORT}"


def test_gateway_command_agrees_with_the_cli_defaults(compose: dict, tmp_path) -> None:
    gateway = compose["services"]["gateway"]
    env = service_env(compose, "gateway", tmp_path / "m", PDSERVE_GATEWAY_ARGS="--max-pending 9")
    argv = container_argv(gateway, tmp_path, env)
    args = parse("gateway", argv[1:])
    assert args.max_pending == 9 and args.model == env["PDSERVE_MODEL"]
    defaults = parse("gateway", ["--decode", "127.0.0.1:1", "--model", "/m"])
    assert args.port == defaults.port == GATEWAY_HTTP_PORT
    assert args.grpc_port == defaults.grpc_port == GATEWAY_GRPC_PORT
    # Every replica behind the service names, re-resolved while the gateway runs.
    assert argv[argv.index("--prefill") + 1] == f"dns:prefill:{PREFILL_PORT}"
    assert argv[argv.index("--decode") + 1] == f"dns:decode:{DECODE_PORT}"
    for name in ("PDSERVE_API_KEY", "PDSERVE_CLUSTER_SECRET"):
        assert name in gateway["environment"] and name not in " ".join(argv)
    published = [":".join(expand_defaults(p).split(":")[-2:]) for p in gateway["ports"]]
    assert published == [f"{GATEWAY_HTTP_PORT}:{GATEWAY_HTTP_PORT}",
                         f"{GATEWAY_GRPC_PORT}:{GATEWAY_GRPC_PORT}"]  # fmt: skip
    assert gateway["healthcheck"]["test"][-1] == f"http://127.0.0.1:{GATEWAY_HTTP_PORT}/health"
    for worker in ("prefill", "decode"):
        assert gateway["depends_on"][worker] == {"condition": "service_healthy"}


def test_dockerfile_matches_compose(compose: dict) -> None:
    text = (ROOT / "Dockerfile").read_text()
    exposed = re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()
    assert exposed == [str(p) for p in (GATEWAY_HTTP_PORT, GATEWAY_GRPC_PORT, PREFILL_PORT,
                                        DECODE_PORT)]  # fmt: skip
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "ARG TORCH_INDEX_URL=" in text
    assert "/home/pdserve/.cache/pdserve" in text
    build_args = compose["services"]["gateway"]["build"]["args"]
    assert set(build_args) == {
        "BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_SPEC", "TORCH_WHEEL", "CA_CERTS", "PIP_INDEX_URL"
    }  # fmt: skip
    for arg in build_args:
        assert re.search(rf"^ARG {arg}=", text, re.M), arg
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "internals.md").read_text()
    return set(METRIC.findall(text.split("## Metrics", 1)[1]))


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    return {name for expr in exprs for name in METRIC.findall(expr)}


def base_name(sample: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def test_dashboard_queries_use_documented_metrics() -> None:
    documented = documented_metrics()
    assert len(documented) >= 10
    unknown = {m for m in dashboard_metrics() if base_name(m) not in documented}
    assert not unknown, f"dashboard metrics missing from docs/internals.md: {sorted(unknown)}"
    titles = " ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]).lower()
    for topic in ("first token", "inter-token", "throughput", "kv cache", "queue", "kv transfer",
                  "prefill and decode time", "time per output token", "prefix cache"):  # fmt: skip
        assert topic in titles, topic


def test_grafana_and_prometheus_provisioning_agree(compose: dict) -> None:
    deploy = ROOT / "deploy"
    ds = yaml.safe_load((deploy / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    dash = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {uid}
    provider = yaml.safe_load((deploy / "grafana/provisioning/dashboards/pdserve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]
    prom = yaml.safe_load((deploy / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == [f"gateway:{GATEWAY_HTTP_PORT}"]
    assert job["metrics_path"] == "/metrics"


def exported_samples(metrics_text: str) -> set[str]:
    """Sample names a Prometheus text page can carry, from its # TYPE lines."""
    suffixes = {"counter": ("_total",), "histogram": HISTOGRAM_SUFFIXES, "gauge": ("",),
                "summary": ("_sum", "_count", "")}  # fmt: skip
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M):
        if kind == "counter":  # text format 0.0.4 names counters with it (not histograms)
            family = family.removesuffix("_total")
        names |= {family + s for s in suffixes.get(kind, ("",))}
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_metrics_are_exported_by_the_gateway(tiny_llama: Path, tmp_path) -> None:
    port = free_port()
    argv = [str(PDSERVE), "gateway", "--model", str(tiny_llama), "--port", str(port),
            "--grpc-port", str(free_port()), "--decode", f"127.0.0.1:{free_port()}"]  # fmt: skip
    log = (tmp_path / "gateway.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        text = wait_for_metrics(f"http://127.0.0.1:{port}/metrics", proc, tmp_path / "gateway.log")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    missing = sorted(dashboard_metrics() - exported_samples(text))
    assert not missing, f"dashboard queries metrics the gateway does not export: {missing}"


def wait_for_metrics(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gateway exited:\n{log.read_text()[-3000:]}"
        try:
            resp = httpx.get(url, timeout=2)
            if resp.status_code == 200:
                return resp.text
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no /metrics within {timeout}s:\n{log.read_text()[-3000:]}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
