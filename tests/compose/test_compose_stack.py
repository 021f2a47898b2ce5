"""compose.yaml brought up for real with docker-compose: build, 2 decode workers, a greedy
completion through the gateway, Prometheus scraping, teardown. Opt-in: `make test-compose`
(`pytest -m compose tests/compose`); the default run deselects it.

Needs a Docker engine (started here if `dockerd` is installed but not running) and
docker-compose; no registry image is pulled: the base image is made with debootstrap
(`PDSERVE_COMPOSE_BASE_IMAGE` names one to use instead), the pdserve image takes the local CPU
torch wheel and the machine's extra CA certificates as build arguments, and Prometheus is built
from Debian's package (deploy/prometheus/Dockerfile). Grafana is left out (no image to be had).
Missing prerequisites fail the test with what to install; they never skip it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from pdserve.default_model import DEFAULT_MODEL_NAME, resolve_model

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("PDSERVE_COMPOSE_BASE_IMAGE", "pdserve-base:bookworm")
DEBIAN_MIRROR = os.environ.get("PDSERVE_COMPOSE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PROMETHEUS_IMAGE = "pdserve-prometheus:compose-test"
SERVICES = ["model", "prefill", "decode", "gateway", "prometheus"]
READY_TIMEOUT_S = 900
PROMPT = "The capital of France is"
MAX_TOKENS = 16


def run(*argv: str, timeout: float = 1800, env: dict | None = None, check: bool = True):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def need(binary: str, how: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: {how}")
    return path


@pytest.fixture(scope="module")
def docker_engine() -> Iterator[None]:
    need("docker", "apt-get install docker.io")
    need("docker-compose", "apt-get install docker-compose")
    started = None
    if run("docker", "info", check=False, timeout=60).returncode != 0:
        dockerd = need("dockerd", "apt-get install docker.io, or start a Docker engine")
        log = open(tempfile.gettempdir() + "/pdserve-compose-dockerd.log", "w")  # noqa: SIM115
        started = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while run("docker", "info", check=False, timeout=60).returncode != 0:
            assert started.poll() is None, f"dockerd exited {started.returncode}: see {log.name}"
            assert time.monotonic() < deadline, f"dockerd did not come up: see {log.name}"
            time.sleep(1)
    yield
    if started is not None:
        started.terminate()
        started.wait(timeout=60)


def ensure_base_image() -> None:
    if run("docker", "image", "inspect", BASE_IMAGE, check=False, timeout=60).returncode == 0:
        return
    need("debootstrap", "apt-get install debootstrap (or set PDSERVE_COMPOSE_BASE_IMAGE)")
    with tempfile.TemporaryDirectory() as rootfs:
        run("debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout,
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
        tar.wait()
        assert imported.returncode == 0, imported.stderr


def local_torch_wheel() -> str:
    """The CPU torch wheel pip would install here, copied into the build context's wheels/."""
    with tempfile.TemporaryDirectory() as tmp:
        run("python3", "-m", "pip", "download", "-q", "--no-deps", "torch==2.13.0", "-d", tmp)
        (wheel,) = Path(tmp).glob("torch-*.whl")
        target = ROOT / "wheels" / wheel.name
        if not target.exists():
            shutil.copy(wheel, target)
    return f"wheels/{wheel.name}"


def extra_ca_certs() -> str:
    """Certificates this machine trusts beyond the usual ones (a TLS-intercepting proxy's)."""
    folder = Path("/usr/local/share/ca-certificates")
    return "".join(p.read_text() for p in sorted(folder.glob("*.crt"))) if folder.is_dir() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(docker_engine) -> Iterator[dict]:
    ensure_base_image()
    args = {"BASE_IMAGE": BASE_IMAGE, "TORCH_WHEEL": local_torch_wheel(),
            "CA_CERTS": extra_ca_certs()}  # fmt: skip
    build = ["docker", "build", "-q", "-t", "pdserve:latest"]
    for key, value in args.items():
        build += ["--build-arg", f"{key}={value}"]
    run(*build, str(ROOT))
    run("docker", "build", "-q", "-t", PROMETHEUS_IMAGE, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "-f", str(ROOT / "deploy/prometheus/Dockerfile"), str(ROOT / "deploy/prometheus"))  # fmt: skip
    project = f"pdserve-test-{uuid.uuid4().hex[:8]}"
    ports = {"PDSERVE_HTTP_PORT": free_port(), "PDSERVE_GRPC_PORT": free_port(),
             "PDSERVE_PROMETHEUS_PORT": free_port()}  # fmt: skip
    env = {**os.environ, **{k: str(v) for k, v in ports.items()},
           "PDSERVE_PROMETHEUS_IMAGE": PROMETHEUS_IMAGE, "PDSERVE_WORKER_ARGS":
           "--kv-cache-memory 256MiB --max-model-len 2048"}  # fmt: skip
    compose = ["docker-compose", "-p", project, "-f", str(ROOT / "compose.yaml")]
    info = {"project": project, "compose": compose, "env": env,
            "http": f"http://127.0.0.1:{ports['PDSERVE_HTTP_PORT']}",
            "prometheus": f"http://127.0.0.1:{ports['PDSERVE_PROMETHEUS_PORT']}"}  # fmt: skip
    try:
        run(*compose, "up", "-d", "--no-build", "--scale", "decode=2", *SERVICES, env=env)
        yield info
    finally:
        logs = run(*compose, "logs", "--no-color", "--tail", "40", env=env, check=False)
        Path(tempfile.gettempdir(), f"{project}.log").write_text(logs.stdout + logs.stderr)
        run(*compose, "down", "-v", "--remove-orphans", "-t", "40", env=env, check=False)


def wait_healthy(http: str, project: str) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{http}/health", timeout=5)
            last = resp.text
            body = resp.json()
            decode = [w for w in body.get("decode", []) if w["healthy"]]
            prefill = [w for w in body.get("prefill", []) if w["healthy"]]
            if resp.status_code == 200 and body["status"] == "ok" and len(decode) == 2 and prefill:
                return body
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(3)
    pytest.fail(f"stack {project} not healthy in {READY_TIMEOUT_S} s; last /health: {last}")


def test_the_stack_serves_greedy_text_and_prometheus_scrapes_it(stack):
    body = wait_healthy(stack["http"], stack["project"])
    resp = httpx.post(
        f"{stack['http']}/v1/completions",
        json={"model": DEFAULT_MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
              "temperature": 0.0},  # fmt: skip
        timeout=300,
    )
    assert resp.status_code == 200, resp.text
    text = resp.json()["choices"][0]["text"]
    offline = LLM(str(resolve_model(None)), kv_cache_memory=64 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    assert text == offline.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text

    # Idle again: nothing is left queued on any worker (a request once showed queue_depth 2).
    deadline = time.monotonic() + 30
    while True:
        health = httpx.get(f"{stack['http']}/health", timeout=5).json()
        workers = health["prefill"] + health["decode"]
        if all(w["queue_depth"] == 0 for w in workers):
            break
        assert time.monotonic() < deadline, json.dumps(health, indent=1)
        time.sleep(1)
    assert len(workers) == len(body["prefill"]) + len(body["decode"]) == 3

    # Prometheus scrapes the gateway (which carries every worker's load) and finds it up, with
    # every worker's series in what it scraped.
    deadline = time.monotonic() + 60
    while True:
        targets = httpx.get(f"{stack['prometheus']}/api/v1/targets", timeout=5).json()
        active = targets["data"]["activeTargets"]
        if active and all(t["health"] == "up" for t in active):
            break
        assert time.monotonic() < deadline, json.dumps(active, indent=1)
        time.sleep(2)
    query = httpx.get(f"{stack['prometheus']}/api/v1/query", timeout=5,
                      params={"query": "pdserve:worker_healthy"}).json()  # fmt: skip
    roles = sorted(r["metric"]["role"] for r in query["data"]["result"])
    assert roles == ["decode", "decode", "prefill"], query


def test_teardown_leaves_nothing(stack):
    """Runs last in the module: after `down -v` no container, network or volume of the project
    is left (checked by bringing it down here and looking)."""
    compose, env = stack["compose"], stack["env"]
    run(*compose, "down", "-v", "--remove-orphans", "-t", "40", env=env)
    label = f"label=com.docker.compose.project={stack['project']}"
    for kind in ("ps -a", "network ls", "volume ls"):
        out = run("docker", *kind.split(), "-q", "--filter", label).stdout.strip()
        assert out == "", f"docker {kind} still lists {out}"
