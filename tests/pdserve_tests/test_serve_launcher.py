"""The local-cluster launcher with stand-in children (tiny HTTP servers), and serve's flags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.cli import build_parser
from pdserve.commands.serve import banner, cluster_options, engine_flag_argv, gateway_flag_argv
from pdserve.launcher import ClusterOptions, plan_cluster

LAUNCHER = Path(__file__).resolve().parents[2] / "pdserve" / "launcher.py"

STAND_IN = textwrap.dedent(
    """
    import http.server, os, signal, sys
    port, mode = int(sys.argv[1]), sys.argv[2]
    print(f"pid {os.getpid()} mode {mode}", flush=True)
    if mode == "crash":
        print("loading weights", flush=True)
        print("error: boom", flush=True)
        sys.exit(3)
    def on_term(*_):
        if mode == "stubborn":
            print("ignoring SIGTERM", flush=True)
            return
        print("draining", flush=True)
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, on_term)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503 if mode == "unhealthy" else 200)
            self.end_headers()
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", port), Health)
    print(f"listening on {port}", flush=True)
    if mode == "die_later":
        import threading
        threading.Timer(1.5, lambda: os._exit(4)).start()
    server.serve_forever(poll_interval=0.05)
    """
)

DRIVER = textwrap.dedent(
    """
    import sys
    from pdserve.launcher import ChildSpec, Probe, RestartPolicy, RunOptions, run_cluster
    stand_in, grace, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    restart = RestartPolicy(max_restarts=int(sys.argv[4]), backoff_s=0.2, max_backoff_s=0.5)
    specs = []
    for item in sys.argv[5:]:
        role, port, mode = item.split(":")
        argv = (sys.executable, stand_in, port, mode)
        specs.append(ChildSpec(role, argv, Probe(f"http://127.0.0.1:{port}/health")))
    sys.exit(run_cluster(specs, RunOptions(ready_timeout_s=timeout, grace_s=grace,
                                           banner="READY", restart=restart)))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a reparented zombie may wait a while for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


class Driver:
    """A launcher process running stand-in children; collects its output lines."""

    def __init__(self, tmp: Path, children: list[str], grace: float = 5.0, timeout: float = 30.0,
                 max_restarts: int = 5):  # fmt: skip
        (tmp / "stand_in.py").write_text(STAND_IN)
        (tmp / "driver.py").write_text(DRIVER)
        argv = [sys.executable, str(tmp / "driver.py"), str(tmp / "stand_in.py"), str(grace),
                str(timeout), str(max_restarts), *children]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(LAUNCHER.parents[1]), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)  # fmt: skip
        self.lines: list[str] = []

    def read_until(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if needle in line:
                return
        raise AssertionError(f"{needle!r} not seen; output:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 30.0) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines += out.splitlines()
        return self.proc.returncode

    def pids(self) -> list[int]:
        """Watcher pids (from 'started ... (pid N)') and stand-in pids ('pid N mode')."""
        found = []
        for line in self.lines:
            text = line.split(" | ", 1)[-1]
            if text.startswith("started "):
                found.append(int(text.split("(pid ")[1].split(")")[0]))
            elif text.startswith("pid "):
                found.append(int(text.split()[1]))
        return found

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def driver_factory(tmp_path: Path) -> Iterator:
    made: list[Driver] = []

    def make(*children: str, **kw: float) -> Driver:
        made.append(Driver(tmp_path, list(children), **kw))
        return made[-1]

    yield make
    for d in made:  # never leave a process behind, even when a test fails
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        for pid in d.pids():
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if is_running(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def test_sigterm_drains_gateway_first_and_leaves_no_process(driver_factory) -> None:
    d = driver_factory(f"decode-0:{free_port()}:ok", f"gateway:{free_port()}:ok")
    d.read_until("serve | READY")
    assert d.text().count("listening on") == 2
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0
    text = d.text()
    assert text.index("stopping gateway") < text.index("stopping decode-0")
    assert "  gateway | draining" in text and "decode-0 | draining" in text
    assert "killing" not in text
    pids = d.pids()
    assert len(pids) == 4  # two watchers, two stand-ins
    assert wait_gone(pids) == []


def test_a_child_dying_at_start_fails_with_its_log_tail(driver_factory) -> None:
    d = driver_factory(f"prefill-0:{free_port()}:crash", f"gateway:{free_port()}:ok")
    assert d.finish() == 1
    text = d.text()
    assert "error: prefill-0 exited with status 3; last lines of its log:" in text
    tail = text.split("last lines of its log:")[1]
    assert "prefill-0 | loading weights" in tail and "prefill-0 | error: boom" in tail
    assert "READY" not in text
    assert wait_gone(d.pids()) == []


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period(driver_factory) -> None:
    d = driver_factory(f"decode-0:{free_port()}:stubborn", grace=1.0)
    d.read_until("serve | READY")
    started = time.monotonic()
    d.proc.send_signal(signal.SIGINT)
    assert d.finish() == 0
    assert 0.9 < time.monotonic() - started < 10
    assert "decode-0 | ignoring SIGTERM" in d.text() and "killing decode-0 (SIGKILL)" in d.text()
    assert wait_gone(d.pids()) == []


def test_children_exit_when_the_launcher_is_killed(driver_factory) -> None:
    d = driver_factory(f"decode-0:{free_port()}:ok", f"gateway:{free_port()}:ok")
    d.read_until("serve | READY")
    d.proc.kill()  # no chance to clean up: the watchers must notice
    d.finish()
    pids = d.pids()
    assert len(pids) == 4
    assert wait_gone(pids) == []


def test_a_killed_child_is_restarted_and_the_others_keep_running(driver_factory) -> None:
    gateway_port = free_port()
    d = driver_factory(f"decode-0:{free_port()}:ok", f"gateway:{gateway_port}:ok")
    d.read_until("serve | READY")
    first = [int(line.split()[-3]) for line in d.lines if "decode-0 | pid " in line]
    gateway_pids = [int(line.split()[-3]) for line in d.lines if "gateway | pid " in line]
    os.kill(first[0], signal.SIGKILL)
    d.read_until("decode-0 exited with status 137; restarting it in 0.2 s")
    d.read_until("started decode-0 again")
    d.read_until("decode-0 | listening on")
    assert is_running(gateway_pids[0])  # untouched
    with socket.create_connection(("127.0.0.1", gateway_port), timeout=5):
        pass
    assert d.proc.poll() is None
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0
    assert wait_gone(d.pids()) == []


def test_a_crash_loop_stops_the_cluster_naming_the_child_and_its_log(driver_factory) -> None:
    # die_later exits (status 4) 1.5 s after every start: 3 exits allowed, the 4th stops it all.
    d = driver_factory(f"decode-0:{free_port()}:die_later", f"gateway:{free_port()}:ok",
                       max_restarts=3)  # fmt: skip
    d.read_until("serve | READY")
    assert d.finish(timeout=60) == 1
    text = d.text()
    assert text.count("decode-0 exited with status 4; restarting it") == 3
    assert text.count("started decode-0 again") == 3
    assert "error: decode-0 exited with status 4 (crash loop: 4 exits within 60 s); " in text
    tail = text.split("last lines of its log:")[1]
    assert "decode-0 | listening on" in tail
    assert "stopping gateway (SIGTERM)" in text
    assert wait_gone(d.pids()) == []


def test_a_child_that_never_gets_healthy_times_out(driver_factory) -> None:
    d = driver_factory(f"gateway:{free_port()}:unhealthy", timeout=1.0)
    assert d.finish() == 1
    assert "error: not ready after 1s: gateway" in d.text()
    assert wait_gone(d.pids()) == []


def test_probe_command_exit_status(driver_factory) -> None:
    port = free_port()
    d = driver_factory(f"gateway:{port}:ok")
    d.read_until("serve | READY")
    run = [sys.executable, "-I", str(LAUNCHER), "probe"]
    assert subprocess.run([*run, f"http://127.0.0.1:{port}/health"]).returncode == 0
    assert subprocess.run([*run, f"tcp://127.0.0.1:{port}"]).returncode == 0
    assert subprocess.run([*run, f"http://127.0.0.1:{free_port()}/health"]).returncode == 1
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0


def parse_serve(*argv: str):  # noqa: ANN201
    return build_parser(["serve"]).parse_args(["serve", *argv])


def test_plan_passes_engine_flags_to_workers_and_addresses_to_the_gateway() -> None:
    args = parse_serve(
        "--num-prefill", "2", "--num-decode", "2", "--max-model-len", "256",
        "--no-enable-prefix-caching", "--kv-cache-memory", "64MiB", "--max-num-seqs", "8",
        "--served-model-name", "tiny", "--api-key", "k", "--log-level", "debug",
        "--port", "9000", "--grpc-port", "9001",
    )  # fmt: skip
    specs = plan_cluster(cluster_options(args, Path("/models/tiny-llama")))
    assert [s.role for s in specs] == ["prefill-0", "prefill-1", "decode-0", "decode-1", "gateway"]
    engine = ["--max-model-len", "256", "--kv-cache-memory", str(64 * 2**20),
              "--max-num-seqs", "8", "--no-enable-prefix-caching"]  # fmt: skip
    assert sorted(engine_flag_argv(args)) == sorted(engine)
    for spec, port in zip(specs[:4], (50061, 50062, 50071, 50072), strict=True):
        role = spec.role.split("-")[0]
        assert spec.argv[1:4] == ("-m", "pdserve.cli", role)
        assert spec.argv[4:14] == ("--port", str(port), "--model", "/models/tiny-llama",
                                   "--engine-id", spec.role, "--log-level", "DEBUG",  # workers' case
                                   "--drain-timeout", "30")  # fmt: skip
        assert sorted(spec.argv[14:]) == sorted(engine)
        assert spec.probe.target == f"grpc://127.0.0.1:{port}"
    gw = specs[-1].argv
    flag = {gw[i]: gw[i + 1] for i in range(4, len(gw) - 1, 2)}
    assert flag["--prefill"] == "127.0.0.1:50061,127.0.0.1:50062"
    assert flag["--decode"] == "127.0.0.1:50071,127.0.0.1:50072"
    assert (flag["--port"], flag["--grpc-port"], flag["--host"]) == ("9000", "9001", "127.0.0.1")
    assert flag["--log-level"] == "debug"  # the gateway's case
    assert flag["--served-model-name"] == "tiny" and "--api-key" not in flag
    # Secrets travel in the environment, not visible in `ps`; one cluster secret for all.
    secret = specs[0].env["PDSERVE_CLUSTER_SECRET"]
    assert len(secret) >= 32 and all(secret not in " ".join(s.argv) for s in specs)
    assert specs[-1].env == {"PDSERVE_API_KEY": "k", "PDSERVE_CLUSTER_SECRET": secret}
    assert all(s.env["PDSERVE_CLUSTER_SECRET"] == secret for s in specs)
    again = plan_cluster(cluster_options(args, Path("/models/tiny-llama")))
    assert again[0].env["PDSERVE_CLUSTER_SECRET"] != secret  # a new one per run
    assert flag["--max-model-len"] == "256" and flag["--model"] == "/models/tiny-llama"
    assert specs[-1].probe.target == "http://127.0.0.1:9000/health"


def test_worker_flags_round_trip_through_the_engine_parser() -> None:
    from engine.cli_args import add_engine_args, engine_config_from_args

    args = parse_serve("--block-size", "32", "--no-enable-prefix-caching", "--seed", "7",
                       "--kv-cache-memory", "1GiB", "--dtype", "float32")  # fmt: skip
    import argparse

    worker = argparse.ArgumentParser()
    add_engine_args(worker)
    parsed = worker.parse_args(["--model", "/m", *engine_flag_argv(args)])
    want = engine_config_from_args(args)
    want.model = "/m"
    assert engine_config_from_args(parsed) == want
    assert gateway_flag_argv(parse_serve()) == []


def test_generation_config_goes_to_the_gateway(tmp_path) -> None:
    assert gateway_flag_argv(parse_serve("--generation-config", "vllm")) == [
        "--generation-config",
        "vllm",
    ]
    args = parse_serve("--generation-config", str(tmp_path))
    assert gateway_flag_argv(args) == ["--generation-config", str(tmp_path)]
    assert parse_serve().generation_config == "auto"  # not passed: the gateway's default


def test_a_generation_config_folder_that_is_missing_is_refused(tmp_path, capsys) -> None:
    from pdserve.commands.serve import run

    assert run(parse_serve("--generation-config", str(tmp_path / "missing"))) == 2
    assert "neither 'auto', 'vllm' nor a folder" in capsys.readouterr().err


def test_aggregated_mode_starts_no_prefill_worker() -> None:
    opts = ClusterOptions(model="/m", aggregated=True, num_decode=2)
    specs = plan_cluster(opts)
    assert [s.role for s in specs] == ["decode-0", "decode-1", "gateway"]
    assert "--prefill" not in specs[-1].argv
    assert "1P+" not in banner(opts, "m", None) and "aggregated" in banner(opts, "m", None)


def test_overlapping_ports_and_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="ports overlap"):
        ClusterOptions(model="/m", num_prefill=11)  # 50061..50071 hits the first decode port
    with pytest.raises(ValueError, match="num-decode"):
        ClusterOptions(model="/m", num_decode=0)
    with pytest.raises(ValueError, match="num-prefill"):
        ClusterOptions(model="/m", num_prefill=0)


def test_banner_has_the_base_url_and_a_curl_example() -> None:
    opts = ClusterOptions(model="/m", host="0.0.0.0", port=8123)
    text = banner(opts, "tiny", api_key="secret")
    assert "http://127.0.0.1:8123/v1" in text
    assert "curl http://127.0.0.1:8123/v1/completions" in text and '"model": "tiny"' in text
    assert "secret" not in text and "Authorization: Bearer" in text


def test_resolve_lists_every_address_of_a_name() -> None:
    run = [sys.executable, "-I", str(LAUNCHER), "resolve"]
    done = subprocess.run([*run, "localhost:50071"], capture_output=True, text=True)
    assert done.returncode == 0 and "127.0.0.1:50071" in done.stdout.strip().split(",")
    bad = subprocess.run([*run, "no-such-host.invalid:1"], capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot resolve" in bad.stderr
