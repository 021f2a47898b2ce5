"""Local cluster launcher: prefill and decode workers plus a gateway as child processes.

`pdserve serve` plans the children with `plan_cluster` and runs them with `run_cluster`.

Process model (no orphans, without prctl):
- every child runs under a small watcher (`python -I launcher.py watch ...`), started in a new
  session, so the watcher and the child it starts share one process group;
- a graceful stop sends SIGTERM to the watcher only, which forwards it to the child exactly once
  (servers treat a second SIGTERM as "exit now"); after the grace period the launcher sends
  SIGKILL to the whole group;
- the watcher polls its parent id; when the launcher dies (even by SIGKILL) the watcher stops
  the child the same way.

Supervision: once everything is ready, a child that exits is started again on the same
command line (same port) after a backoff that doubles with each exit in the restart window; the
others keep running (the gateway routes around a missing worker). More than `max_restarts`
exits of one child within `window_s` is a crash loop: the launcher prints the child's last log
lines and stops the cluster. A child that dies before the cluster was first ready is fatal at
once (a bad flag or model would only loop).

This module imports only the standard library at the top, so the watcher and the health probe
(`python -I launcher.py probe URL`, used by compose health checks) start fast and do not depend
on the rest of the package.
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GATEWAY_HTTP_PORT = 8000
GATEWAY_GRPC_PORT = 50051
PREFILL_PORT = 50061  # first prefill worker; the next ones count up
DECODE_PORT = 50071  # first decode worker; the next ones count up
LOOPBACK = "127.0.0.1"
GATEWAY_API_KEY_ENV = "PDSERVE_API_KEY"  # read by `pdserve gateway` (keeps the key off argv)
CLUSTER_SECRET_ENV = "PDSERVE_CLUSTER_SECRET"  # rpc.auth.CLUSTER_SECRET_ENV (stdlib-only here)
WATCH_POLL_S = 0.5  # how often a watcher checks that the launcher is still alive
PROBE_INTERVAL_S = 0.5  # between readiness probes while starting
LOG_TAIL_LINES = 40  # lines of a child's log kept for the error report when it dies


# --------------------------------------------------------------------------- plan


@dataclass(slots=True, frozen=True)
class Probe:
    """How to tell a child is ready: `http://...` (200 expected), `grpc://H:P`, or `tcp://H:P`."""

    target: str

    def __post_init__(self) -> None:
        if not self.target.startswith(("http://", "https://", "grpc://", "tcp://")):
            raise ValueError(f"probe must be an http(s)://, grpc:// or tcp:// URL: {self.target!r}")


@dataclass(slots=True, frozen=True)
class ChildSpec:
    role: str  # "prefill-0", "decode-1", "gateway": the log prefix
    argv: tuple[str, ...]
    probe: Probe
    env: dict[str, str] = field(default_factory=dict)  # added to the launcher's environment


@dataclass(slots=True, frozen=True)
class ClusterOptions:
    model: str  # a resolved local HF folder, given to every child
    host: str = LOOPBACK  # gateway bind address; workers always bind 127.0.0.1
    port: int = GATEWAY_HTTP_PORT
    grpc_port: int = GATEWAY_GRPC_PORT
    num_prefill: int = 1
    num_decode: int = 1
    aggregated: bool = False  # no prefill workers: decode workers prefill locally
    prefill_port: int = PREFILL_PORT
    decode_port: int = DECODE_PORT
    worker_log_level: str = "INFO"  # as `pdserve prefill/decode --log-level` spell it
    gateway_log_level: str = "info"  # as `pdserve gateway --log-level` spells it
    api_key: str | None = None  # given to the gateway in its environment, not on its argv
    drain_timeout_s: float = 30.0  # each child's own drain; the launcher waits a little longer
    worker_args: tuple[str, ...] = ()  # engine flags, passed to every worker
    gateway_args: tuple[str, ...] = ()  # e.g. --served-model-name, --api-key, --chat-template
    python: str = sys.executable
    # Shared by the gateway and every worker, in their environment; a new one for each run.
    cluster_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    def __post_init__(self) -> None:
        if self.num_decode < 1:
            raise ValueError(f"--num-decode must be >= 1, got {self.num_decode}")
        if self.num_prefill < (0 if self.aggregated else 1):
            raise ValueError(
                f"--num-prefill must be >= 1, got {self.num_prefill} (no prefill workers: --aggregated)"
            )
        ports = [self.port, self.grpc_port, *self.prefill_ports, *self.decode_ports]
        if any(not 0 < p < 65536 for p in ports):
            raise ValueError(f"ports must be in 1..65535, got {sorted(ports)}")
        if len(set(ports)) != len(ports):
            raise ValueError(f"ports overlap: {sorted(ports)} (move --prefill-port/--decode-port)")

    @property
    def prefill_ports(self) -> list[int]:
        count = 0 if self.aggregated else self.num_prefill
        return [self.prefill_port + i for i in range(count)]

    @property
    def decode_ports(self) -> list[int]:
        return [self.decode_port + i for i in range(self.num_decode)]

    @property
    def local_host(self) -> str:
        """Where this machine reaches the gateway (a wildcard bind is reached on loopback)."""
        return LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def base_url(self) -> str:
        return f"http://{self.local_host}:{self.port}"


def pdserve_argv(python: str, command: str, *args: str) -> tuple[str, ...]:
    return (python, "-m", "pdserve.cli", command, *args)


def _worker(opts: ClusterOptions, role: str, index: int, port: int) -> ChildSpec:
    name = f"{role}-{index}"
    argv = pdserve_argv(
        opts.python, role, "--port", str(port), "--model", opts.model, "--engine-id", name,
        "--log-level", opts.worker_log_level, "--drain-timeout", f"{opts.drain_timeout_s:g}",
        *opts.worker_args,
    )  # fmt: skip
    env = {CLUSTER_SECRET_ENV: opts.cluster_secret}
    return ChildSpec(name, argv, Probe(f"grpc://{LOOPBACK}:{port}"), env)


def _gateway(opts: ClusterOptions) -> ChildSpec:
    args = ["--model", opts.model, "--host", opts.host, "--port", str(opts.port)]
    args += ["--grpc-port", str(opts.grpc_port), "--log-level", opts.gateway_log_level]
    if opts.prefill_ports:
        args += ["--prefill", ",".join(f"{LOOPBACK}:{p}" for p in opts.prefill_ports)]
    args += ["--decode", ",".join(f"{LOOPBACK}:{p}" for p in opts.decode_ports)]
    argv = pdserve_argv(opts.python, "gateway", *args, *opts.gateway_args)
    env = {CLUSTER_SECRET_ENV: opts.cluster_secret}
    if opts.api_key:
        env[GATEWAY_API_KEY_ENV] = opts.api_key
    return ChildSpec("gateway", argv, Probe(f"{opts.base_url}/health"), env)


def plan_cluster(opts: ClusterOptions) -> list[ChildSpec]:
    """Workers first, the gateway last (the order of start; stop runs the other way)."""
    prefill = [_worker(opts, "prefill", i, p) for i, p in enumerate(opts.prefill_ports)]
    decode = [_worker(opts, "decode", i, p) for i, p in enumerate(opts.decode_ports)]
    return [*prefill, *decode, _gateway(opts)]


# --------------------------------------------------------------------------- probes


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def probe_http(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def probe_tcp(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection(_host_port(address), timeout=timeout_s):
            return True
    except OSError:
        return False


def probe_grpc(address: str, timeout_s: float = 2.0) -> bool:
    """grpc.health.v1 Check (overall server status, service "") answers SERVING."""
    import grpc  # only here: the watcher must not need grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as exc:
            # A server without the health service is up (it answered); anything else is not.
            return exc.code() == grpc.StatusCode.UNIMPLEMENTED
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def probe(target: Probe | str) -> bool:
    url = target.target if isinstance(target, Probe) else target
    scheme, _, rest = url.partition("://")
    if scheme in ("http", "https"):
        return probe_http(url)
    if scheme == "grpc":
        return probe_grpc(rest)
    if scheme == "tcp":
        return probe_tcp(rest)
    raise ValueError(f"unknown probe scheme in {url!r}")


def resolve_all(address: str) -> list[str]:
    """'decode:50071' -> every IPv4 address the name has, as 'IP:PORT', sorted.

    With `docker compose up --scale decode=2` the service name resolves to every replica, so the
    gateway gets one address per replica.
    """
    host, port = _host_port(address)
    infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({f"{info[4][0]}:{port}" for info in infos})


# --------------------------------------------------------------------------- children


def exit_status(returncode: int) -> int:
    """A shell-style status: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class LogPrinter:
    """Prints lines from many threads, one whole line at a time, prefixed with a role."""

    def __init__(self, stream=None, width: int = 9) -> None:  # noqa: ANN001
        self._stream = stream or sys.stdout
        self._width = width
        self._lock = threading.Lock()

    def line(self, role: str, text: str) -> None:
        with self._lock:
            self._stream.write(f"{role:>{self._width}} | {text}\n")
            self._stream.flush()


@dataclass
class Child:
    """One running child (its watcher's Popen) and the tail of its log."""

    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES)
    )
    pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int, group: bool = False) -> None:
        try:
            if group:
                os.killpg(self.proc.pid, sig)  # the watcher leads its own process group
            else:
                os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def watcher_argv(argv: Sequence[str], grace_s: float) -> list[str]:
    # -I: no script folder, user site or PYTHON* variables on the path; the watcher is stdlib-only.
    return [sys.executable, "-I", str(Path(__file__).resolve()), "watch",
            "--parent", str(os.getpid()), "--grace", str(grace_s), "--", *argv]  # fmt: skip


def _pump(child: Child, printer: LogPrinter) -> None:
    assert child.proc.stdout is not None
    for raw in child.proc.stdout:
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        child.tail.append(text)
        printer.line(child.spec.role, text)


def start_child(spec: ChildSpec, printer: LogPrinter, grace_s: float, env: dict[str, str]) -> Child:
    proc = subprocess.Popen(
        watcher_argv(spec.argv, grace_s),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**env, **spec.env},
        start_new_session=True,  # its own process group: Ctrl-C reaches only the launcher
    )
    child = Child(spec, proc)
    child.pump = threading.Thread(target=_pump, args=(child, printer), daemon=True)
    child.pump.start()
    return child


# --------------------------------------------------------------------------- cluster


class ChildExited(RuntimeError):
    def __init__(self, child: Child, why: str = "") -> None:
        self.child = child
        code = exit_status(child.proc.returncode)
        super().__init__(f"{child.spec.role} exited with status {code}{why}")


@dataclass(slots=True, frozen=True)
class RestartPolicy:
    """Restart a child that exits, after `backoff_s * 2**k` seconds (k: its earlier exits in the
    window, capped at `max_backoff_s`); more than `max_restarts` exits in `window_s` stop the
    cluster (a crash loop)."""

    max_restarts: int = 5
    window_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not (self.window_s > 0 and self.backoff_s >= 0 and self.max_backoff_s >= 0):
            raise ValueError("restart window must be > 0 and backoffs >= 0")

    def delay(self, earlier_exits: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** min(earlier_exits, 30))


class Supervisor:
    """Watches a ready cluster: restarts children that exit, raises ChildExited on a crash loop."""

    def __init__(self, cluster: Cluster, policy: RestartPolicy) -> None:
        self.cluster = cluster
        self.policy = policy
        self._exits: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._due: dict[int, float] = {}  # child index -> when to start it again

    def check(self, now: float) -> None:
        for index, child in enumerate(self.cluster.children):
            if index in self._due:
                if now >= self._due[index]:
                    del self._due[index]
                    self.cluster.restart(index)
            elif not child.alive():
                self._on_exit(index, child, now)

    def _on_exit(self, index: int, child: Child, now: float) -> None:
        exits = self._exits[child.spec.role]
        while exits and now - exits[0] > self.policy.window_s:
            exits.popleft()
        exits.append(now)
        window = f"{self.policy.window_s:g} s"
        if len(exits) > self.policy.max_restarts:
            raise ChildExited(child, f" (crash loop: {len(exits)} exits within {window})")
        delay = self.policy.delay(len(exits) - 1)
        code = exit_status(child.proc.returncode)
        self.cluster.printer.line(
            "serve",
            f"{child.spec.role} exited with status {code}; restarting it in {delay:.1f} s "
            f"(exit {len(exits)} of at most {self.policy.max_restarts + 1} within {window})",
        )
        self._due[index] = now + delay


@dataclass(slots=True)
class StopFlags:
    """Set from signal handlers: the first signal asks for a drain, a second one for a kill."""

    stop: threading.Event = field(default_factory=threading.Event)
    force: threading.Event = field(default_factory=threading.Event)

    def request(self, *_: object) -> None:
        if self.stop.is_set():
            self.force.set()
        self.stop.set()


class Cluster:
    """Starts children, waits until they answer their probes, stops them in reverse order."""

    def __init__(self, specs: Sequence[ChildSpec], printer: LogPrinter, grace_s: float) -> None:
        if not specs:
            raise ValueError("a cluster needs at least one child")
        self.specs = list(specs)
        self.printer = printer
        self.grace_s = grace_s
        self.children: list[Child] = []
        self._env: dict[str, str] = {}

    def start(self) -> None:
        self._env = dict(os.environ, PYTHONUNBUFFERED="1")
        for spec in self.specs:
            child = start_child(spec, self.printer, self.grace_s, self._env)
            self.children.append(child)
            self.printer.line("serve", f"started {spec.role} (pid {child.pid}): "
                                       f"{shlex.join(spec.argv)}")  # fmt: skip

    def restart(self, index: int) -> None:
        """Start child `index` again (it has exited; the whole group is reaped first)."""
        old = self.children[index]
        old.signal(signal.SIGKILL, group=True)  # whatever it left behind in its group
        old.proc.wait()
        child = start_child(old.spec, self.printer, self.grace_s, self._env)
        self.children[index] = child
        self.printer.line("serve", f"started {old.spec.role} again (pid {child.pid})")

    def exited(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)

    def wait_ready(self, timeout_s: float, flags: StopFlags) -> bool:
        """True when every child answers its probe; False when a stop was asked for first.

        The gateway is probed only once every worker answers (its /health needs them anyway).
        Raises ChildExited when a child dies, TimeoutError after `timeout_s`.
        """
        pending = list(self.children)
        deadline = time.monotonic() + timeout_s
        while pending:
            if flags.stop.is_set():
                return False
            if (dead := self.exited()) is not None:
                raise ChildExited(dead)
            pending = self._probe_pending(pending)
            if pending and time.monotonic() > deadline:
                roles = ", ".join(c.spec.role for c in pending)
                raise TimeoutError(f"not ready after {timeout_s:.0f}s: {roles}")
            flags.stop.wait(PROBE_INTERVAL_S if pending else 0)
        return True

    @staticmethod
    def _probe_pending(pending: list[Child]) -> list[Child]:
        workers = [c for c in pending if c.spec.role != "gateway"]
        waiting_workers = [c for c in workers if not probe(c.spec.probe)]
        if waiting_workers:
            return waiting_workers + [c for c in pending if c.spec.role == "gateway"]
        return [c for c in pending if c.spec.role == "gateway" and not probe(c.spec.probe)]

    def stop(self, flags: StopFlags | None = None) -> None:
        """Gateway first (it drains in-flight requests while workers still run), then workers."""
        flags = flags or StopFlags()
        gateways = [c for c in self.children if c.spec.role == "gateway"]
        workers = [c for c in self.children if c.spec.role != "gateway"]
        for group in (gateways, workers):
            self._stop_group(group, flags)
        for child in self.children:
            if child.pump is not None:
                child.pump.join(timeout=2)

    def _stop_group(self, children: list[Child], flags: StopFlags) -> None:
        for child in children:
            if child.alive():
                self.printer.line("serve", f"stopping {child.spec.role} (SIGTERM)")
                child.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while any(c.alive() for c in children):
            if time.monotonic() > deadline or flags.force.is_set():
                break
            time.sleep(0.05)
        for child in children:
            if child.alive():
                self.printer.line("serve", f"killing {child.spec.role} (SIGKILL)")
            child.signal(signal.SIGKILL, group=True)  # also whatever the child left behind
            child.proc.wait()


@dataclass(slots=True, frozen=True)
class RunOptions:
    ready_timeout_s: float = 600.0
    grace_s: float = 30.0
    banner: str = ""  # printed once everything is ready
    restart: RestartPolicy = field(default_factory=RestartPolicy)


def _report_death(printer: LogPrinter, exc: ChildExited) -> None:
    printer.line("serve", f"error: {exc}; last lines of its log:")
    if exc.child.pump is not None:
        exc.child.pump.join(timeout=2)  # let the last lines arrive
    for text in exc.child.tail:
        printer.line(exc.child.spec.role, text)


def _serve_until_stopped(cluster: Cluster, flags: StopFlags, opts: RunOptions) -> int:
    if not cluster.wait_ready(opts.ready_timeout_s, flags):
        return 0
    for text in (opts.banner or "ready").splitlines():
        cluster.printer.line("serve", text)
    supervisor = Supervisor(cluster, opts.restart)
    while not flags.stop.wait(0.1):
        supervisor.check(time.monotonic())
    return 0


def run_cluster(
    specs: Sequence[ChildSpec], opts: RunOptions, printer: LogPrinter | None = None
) -> int:
    """Runs the cluster until SIGINT/SIGTERM (0) or until a child dies or never gets ready (1).

    Must run on the main thread (it installs signal handlers).
    """
    printer = printer or LogPrinter()
    flags = StopFlags()
    previous = {s: signal.signal(s, flags.request) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = Cluster(specs, printer, opts.grace_s)
    code = 1
    try:
        cluster.start()
        code = _serve_until_stopped(cluster, flags, opts)
    except ChildExited as exc:
        _report_death(printer, exc)
    except TimeoutError as exc:
        printer.line("serve", f"error: {exc}")
    finally:
        printer.line("serve", "shutting down")
        cluster.stop(flags)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        printer.line("serve", "all processes exited")
    return code


# --------------------------------------------------------------------------- watcher


def watch(parent_pid: int, grace_s: float, argv: Sequence[str]) -> int:
    """Runs argv; forwards one SIGTERM to it; stops it when `parent_pid` is no longer our parent."""
    child = subprocess.Popen(list(argv))  # same process group as the watcher
    forwarded = threading.Event()

    def forward(*_: object) -> None:
        if not forwarded.is_set():
            forwarded.set()
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when to stop
    while True:
        try:
            return exit_status(child.wait(timeout=WATCH_POLL_S))
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent_pid:
            forward()
            try:
                return exit_status(child.wait(timeout=grace_s))
            except subprocess.TimeoutExpired:
                child.kill()
                return exit_status(child.wait())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch", help="run a command; stop it when the parent process is gone")
    w.add_argument("--parent", type=int, required=True)
    w.add_argument("--grace", type=float, default=30.0)
    w.add_argument("argv", nargs=argparse.REMAINDER)
    p = sub.add_parser("probe", help="exit 0 when a http(s)://, grpc:// or tcp:// probe passes")
    p.add_argument("target")
    r = sub.add_parser("resolve", help="print HOST:PORT as a comma list of all its IP:PORT")
    r.add_argument("address")
    args = parser.parse_args(argv)
    if args.cmd == "probe":
        return 0 if probe(args.target) else 1
    if args.cmd == "resolve":
        return _print_resolved(args.address)
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        parser.error("watch needs a command after --")
    return watch(args.parent, args.grace, command)


def _print_resolved(address: str) -> int:
    try:
        print(",".join(resolve_all(address)))
    except (OSError, ValueError) as exc:
        print(f"cannot resolve {address}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
