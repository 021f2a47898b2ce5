"""Real pdserve processes on free 127.0.0.1 ports for the chaos tests.

Each process is started directly (no watcher in between) so a test can SIGKILL exactly the
worker or gateway it means to, then start it again on the same port. Command lines are built
with the launcher's `pdserve_argv` and readiness uses its probes, so the tests drive the same
CLI `pdserve serve` does. Every child gets PR_SET_PDEATHSIG, so a crashed test run leaves no
orphans behind.

Block accounting goes through the workers' debug RPC (GetDebugState); the gateway is observed
through /health and /metrics only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cluster_token import worker_channel

from pdserve.launcher import LOOPBACK, pdserve_argv, probe
from protos.pdserve.v1 import common_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
# Tiny pools: 1 MiB holds 128 blocks of 16 tokens of the tiny model.
ENGINE_FLAGS = ("--kv-cache-memory", "1MiB", "--device", "cpu", "--block-size", "16",
                "--max-model-len", "512")  # fmt: skip
MODEL_NAME = "tiny"
# The shared cluster's settings (see conftest.py), here so test modules can import them.
P0_LEASE_MS = 4000
P0_TRANSFER_DELAY_MS = 100
# The tiny model decodes faster than a test can look: without a floor per step, 440 tokens can
# be done before a poll sees them running.
DECODE_STEP_DELAY_MS = 3
SMALL_MAX_PENDING = 4
START_TIMEOUT_S = 180.0  # cold start of several torch processes on 2 busy cores
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class Proc:
    """One pdserve process: argv is fixed, so `start()` after a kill reuses the same port."""

    name: str
    role: str  # "prefill", "decode" or "gateway"
    argv: list[str]
    port: int
    log_dir: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.starts}.log"

    def start(self) -> None:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 10.0) -> None:
        """Send `sig` and wait for the exit (SIGKILL if it outlives the timeout)."""
        if not self.alive():
            return
        _kill_quietly(self.pid, sig)
        try:
            self.popen.wait(timeout_s)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            _kill_quietly(self.pid, signal.SIGKILL)
            self.popen.wait(10)  # type: ignore[union-attr]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the duration of the block (a stalled, not dead, process), then SIGCONT."""
        _kill_quietly(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            _kill_quietly(self.pid, signal.SIGCONT)

    def ready(self) -> bool:
        if self.role == "gateway":
            return self.alive() and _get_status(f"http://{self.address}/health") == 200
        return self.alive() and probe(f"grpc://{self.address}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_text(self) -> str:
        """Every start's log, oldest first."""
        parts = []
        for n in range(1, self.starts + 1):
            path = self.log_dir / f"{self.name}.{n}.log"
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)


@dataclass
class Gateway(Proc):
    prefill: list[str] = field(default_factory=list)  # worker names
    decode: list[str] = field(default_factory=list)
    grpc_port: int | None = None  # the gRPC front door, when asked for

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def grpc_address(self) -> str:
        assert self.grpc_port is not None, f"{self.name} has no gRPC port"
        return f"{LOOPBACK}:{self.grpc_port}"


class Cluster:
    """A set of named workers and gateways; tests add what they need and share the rest."""

    def __init__(self, model: Path, log_dir: Path) -> None:
        self.model = model
        self.log_dir = log_dir
        self.workers: dict[str, Proc] = {}
        self.gateways: dict[str, Gateway] = {}

    # -- building ---------------------------------------------------------------------------

    def add_worker(self, name: str, role: str, *extra: str) -> Proc:
        port = free_port()
        argv = list(pdserve_argv(
            sys.executable, role, "--port", str(port), "--model", str(self.model),
            "--engine-id", name, "--drain-timeout", "2", *ENGINE_FLAGS, *extra,
        ))  # fmt: skip
        proc = Proc(name, role, argv, port, self.log_dir)
        self.workers[name] = proc
        return proc

    def add_gateway(
        self, name: str, prefill: list[str], decode: list[str], *extra: str, grpc: bool = False
    ) -> Gateway:
        port = free_port()
        grpc_port = free_port() if grpc else None
        args = ["--model", str(self.model), "--port", str(port),
                "--grpc-port", str(grpc_port or -1),
                "--load-interval", "0.25", "--log-level", "info", "--served-model-name", MODEL_NAME]  # fmt: skip
        if prefill:
            args += ["--prefill", ",".join(self.workers[w].address for w in prefill)]
        args += ["--decode", ",".join(self.workers[w].address for w in decode), *extra]
        argv = list(pdserve_argv(sys.executable, "gateway", *args))
        gateway = Gateway(name, "gateway", argv, port, self.log_dir, prefill=prefill,
                          decode=decode, grpc_port=grpc_port)  # fmt: skip
        self.gateways[name] = gateway
        return gateway

    def procs(self) -> list[Proc]:
        return [*self.workers.values(), *self.gateways.values()]

    # -- running ----------------------------------------------------------------------------

    def start(self, *procs: Proc, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the given processes (default: every one not running) and wait until ready:
        workers answer grpc health, gateways see every one of their workers healthy."""
        todo = list(procs) or [p for p in self.procs() if not p.alive()]
        for proc in todo:
            if not proc.alive():
                proc.start()
        deadline = time.monotonic() + timeout_s
        pending = list(todo)
        while pending:
            for proc in pending:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited at start:\n{proc.log_tail()}")
            pending = [p for p in pending if not self._ready(p)]
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in pending)
                raise TimeoutError(f"not ready after {timeout_s:.0f}s:\n{tails}")
            time.sleep(0.2)

    def _ready(self, proc: Proc) -> bool:
        if isinstance(proc, Gateway):
            return self.gateway_sees_all(proc)
        return proc.ready()

    def ensure_up(self) -> None:
        """Restart whatever a previous test killed and wait until each gateway sees its
        workers again."""
        dead = [p for p in self.procs() if not p.alive()]
        if dead:
            self.start(*dead)
        self.wait_gateways_healthy()

    def wait_gateways_healthy(self, timeout_s: float = 30.0) -> None:
        for gateway in self.gateways.values():
            wait_for(lambda g=gateway: self.gateway_sees_all(g), timeout_s,
                     f"{gateway.name} to see all its workers healthy")  # fmt: skip

    def gateway_sees_all(self, gateway: Gateway) -> bool:
        health = gateway_health(gateway)
        if health is None:
            return False
        states = [*health.get("prefill", []), *health.get("decode", [])]
        want = len(gateway.prefill) + len(gateway.decode)
        return len(states) == want and all(s["healthy"] for s in states)

    def close(self) -> None:
        """SIGTERM everything at once, gateways first; SIGKILL what is left after 10 s."""
        procs = [p for p in [*self.gateways.values(), *self.workers.values()] if p.alive()]
        for proc in procs:
            _kill_quietly(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                proc.kill(signal.SIGKILL)

    # -- observing --------------------------------------------------------------------------

    def debug_state(self, name: str) -> common_pb2.DebugState:
        worker = self.workers[name]
        with worker_channel(worker.address) as channel:
            stub = (worker_pb2_grpc.PrefillServiceStub(channel) if worker.role == "prefill"
                    else worker_pb2_grpc.DecodeServiceStub(channel))  # fmt: skip
            return stub.GetDebugState(common_pb2.GetDebugStateRequest(), timeout=5)

    def load(self, name: str) -> common_pb2.LoadReport:
        worker = self.workers[name]
        with worker_channel(worker.address) as channel:
            stub = (worker_pb2_grpc.PrefillServiceStub(channel) if worker.role == "prefill"
                    else worker_pb2_grpc.DecodeServiceStub(channel))  # fmt: skip
            return stub.GetLoad(common_pb2.GetLoadRequest(), timeout=5)

    def wait_all_free(
        self, *names: str, timeout_s: float = 15.0, settle_s: float = 0.3
    ) -> dict[str, float]:
        """Wait until every named worker (default: every live one) holds no block, lease,
        import, stream or shared-memory segment, and still holds none `settle_s` later (a late
        RPC must not leak after we looked). Returns seconds until each was clean; fails with
        the last debug state of the ones that were not."""
        names = names or tuple(n for n, w in self.workers.items() if w.alive())
        took = self._wait_clean(names, timeout_s)
        time.sleep(settle_s)
        late = {n: _describe(s) for n in names if not is_clean(s := self.debug_state(n))}
        assert not late, f"blocks taken again {settle_s}s after the pools were full: {late}"
        return took

    def _wait_clean(self, names: tuple[str, ...], timeout_s: float) -> dict[str, float]:
        start = time.monotonic()
        took: dict[str, float] = {}
        last: dict[str, common_pb2.DebugState] = {}
        while True:
            for name in names:
                if name in took:
                    continue
                last[name] = self.debug_state(name)
                if is_clean(last[name]):
                    took[name] = time.monotonic() - start
            if len(took) == len(names):
                return took
            if time.monotonic() - start > timeout_s:
                dirty = {n: _describe(s) for n, s in last.items() if n not in took}
                raise AssertionError(f"blocks not back in the pool after {timeout_s}s: {dirty}")
            time.sleep(0.05)


def is_clean(s: common_pb2.DebugState) -> bool:
    return (s.num_free_blocks == s.num_blocks and s.num_held_leases == 0 and s.num_running == 0
            and s.num_waiting == 0 and s.num_pending_imports == 0 and s.num_shm_segments == 0
            and s.num_active_streams == 0)  # fmt: skip


def leaked_blocks(s: common_pb2.DebugState) -> int:
    return s.num_blocks - s.num_free_blocks


def _describe(s: common_pb2.DebugState) -> str:
    return (f"free {s.num_free_blocks}/{s.num_blocks} leases={s.num_held_leases} "
            f"running={s.num_running} waiting={s.num_waiting} "
            f"imports={s.num_pending_imports} shm={s.num_shm_segments} "
            f"streams={s.num_active_streams}")  # fmt: skip


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> float:
    """Poll until `predicate()` is true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - start


def _get_status(url: str, timeout_s: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


def gateway_health(gateway: Gateway) -> dict | None:
    """The /health body (200 or 503), None when the gateway does not answer."""
    try:
        with urllib.request.urlopen(f"{gateway.url}/health", timeout=2) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except ValueError:
            return None
    except (urllib.error.URLError, OSError, ValueError):
        return None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(gateway: Gateway) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out
