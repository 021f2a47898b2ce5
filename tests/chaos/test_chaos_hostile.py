"""Hostile input and exposure: no pickle/eval on any network path, loopback by default, bounded
bodies and headers, no request-supplied templates, and a property-based fuzz of the OpenAI
routes that must never produce a 5xx."""

from __future__ import annotations

import ast
import json
import math
import socket
from pathlib import Path

import grpc
import httpx
import pytest
from chaos_client import LONG_PROMPT
from chaos_cluster import MODEL_NAME, REPO
from cluster_token import worker_channel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.cli import build_parser
from protos.pdserve.v1 import gateway_pb2, gateway_pb2_grpc, kvtransfer_pb2, kvtransfer_pb2_grpc

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

NETWORK_PATHS = ("gateway", "kvtransfer", "worker", "rpc", "contract", "protos",
                 "pdserve/client.py")  # fmt: skip
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle",
                  "joblib"}  # fmt: skip
UNSAFE_BUILTINS = {"eval", "exec"}
UNSAFE_CALLS = {("torch", "load")}  # torch.load unpickles


# --------------------------------------------------------------------------- static checks


def unsafe_uses(source: str) -> list[str]:
    """What in `source` could turn wire bytes into code: unsafe imports and calls."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]  # fmt: skip
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_BUILTINS | {"__import__"}:
                found.append(f"{func.id}(...)")
            elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                  and (func.value.id, func.attr) in UNSAFE_CALLS):  # fmt: skip
                found.append(f"{func.value.id}.{func.attr}(...)")
            if any(k.arg == "allow_pickle" for k in node.keywords):
                found.append("allow_pickle=...")
    return found


def test_the_scanner_catches_what_it_looks_for():
    bad = ("import pickle\nfrom marshal import loads\nimport shelve as s\neval('1')\n"
           "exec('x=1')\ntorch.load(f)\nnp.load(f, allow_pickle=True)\n")  # fmt: skip
    assert len(unsafe_uses(bad)) == 7
    assert unsafe_uses("import json\njson.loads('1')\nmodel.eval()\n") == []


def network_files() -> list[Path]:
    files: list[Path] = []
    for entry in NETWORK_PATHS:
        path = REPO / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_no_pickle_marshal_or_eval_on_any_network_path():
    files = network_files()
    assert len(files) > 40, f"scanned only {len(files)} files: paths moved?"
    offenders = {str(f.relative_to(REPO)): uses for f in files
                 if (uses := unsafe_uses(f.read_text()))}  # fmt: skip
    assert not offenders, offenders


@pytest.mark.parametrize("argv", [["prefill"], ["decode"], ["gateway", "--decode", "h:1"],
                                  ["serve"]])  # fmt: skip
def test_every_command_binds_loopback_by_default(argv):
    args = build_parser(argv).parse_args(argv)
    assert args.host == "127.0.0.1"


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F",  # 127.0.0.1, ::ffff:127.0.0.1
                "00000000000000000000000001000000"}  # ::1  # fmt: skip


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) LISTENing on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                out.append(address)
    return out


def test_the_running_cluster_listens_on_loopback_only(up):
    ports = [p.port for p in up.procs()]
    ports += [g.grpc_port for g in up.gateways.values() if g.grpc_port]
    for port in ports:
        addresses = _listening(port)
        assert addresses, f"nothing listens on {port}"
        assert set(addresses) <= LOOPBACK_HEX, (port, addresses)


# --------------------------------------------------------------------------- HTTP limits


def test_oversize_body_is_413_declared_or_chunked(up):
    url = f"{up.gateways['main'].url}/v1/completions"
    big = json.dumps({"prompt": "a" * (9 * 2**20), "max_tokens": 1}).encode()
    with httpx.Client(timeout=60) as client:
        declared = client.post(url, content=big, headers={"Content-Type": "application/json"})
        chunked = client.post(url, content=(big[i : i + 2**20] for i in range(0, len(big), 2**20)),
                              headers={"Content-Type": "application/json"})  # fmt: skip
        for resp in (declared, chunked):
            assert resp.status_code == 413, resp.text[:200]
            assert resp.json()["error"]["type"] == "request_too_large"
        assert client.post(url, json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def _raw_http(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send a raw request; the status line of the answer (b"" if the server just hung up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head + body)
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
    return data.split(b"\r\n", 1)[0]


def _post_head(headers: bytes, body: bytes) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            + headers + b"\r\n")  # fmt: skip


@pytest.mark.parametrize(
    "headers",
    [
        b"".join(b"X-Filler-%d: v\r\n" % i for i in range(1000)),  # many small ones
        b"X-Big: " + b"a" * 200_000 + b"\r\n",  # one huge one
        b"".join(b"X-Wide-%d: %s\r\n" % (i, b"w" * 1000) for i in range(60)),  # 60 KB in all
    ],
    ids=["1000-headers", "200KB-header", "60KB-of-headers"],
)
def test_header_floods_are_refused(up, headers):
    gateway = up.gateways["main"]
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    status = _raw_http(gateway.port, _post_head(headers, body), body)
    assert status == b"" or status.split()[1] in (b"400", b"431"), status
    ok = _raw_http(gateway.port, _post_head(b"", body), body)
    assert ok.split()[1] == b"200", ok


def test_a_chat_template_in_the_request_is_refused(up):
    url = f"{up.gateways['main'].url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "chat_template": "{{ cycler.__init__.__globals__ }}"}  # fmt: skip
    resp = httpx.post(url, json=body, timeout=30)
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["error"]["param"] == "chat_template"


def test_malformed_kv_reads_are_refused_cleanly(up):
    """Reads naming unknown transfers, foreign epochs or hashes, or out-of-range blocks."""
    p0 = up.workers["p0"]
    epoch = up.load("p0").epoch
    with worker_channel(p0.address) as channel:
        stub = kvtransfer_pb2_grpc.KVTransferServiceStub(channel)
        bad = [
            kvtransfer_pb2.ReadBlocksRequest(transfer_id="nope", block_ids=[0], epoch=epoch),
            kvtransfer_pb2.ReadBlocksRequest(transfer_id="nope", block_ids=[2**31], epoch=1),
            kvtransfer_pb2.ReadBlocksRequest(transfer_id="", block_ids=[], epoch=epoch,
                                             compat_hash="x" * 10_000, layers=[99]),
        ]  # fmt: skip
        for request in bad:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ReadBlocks(request, timeout=10))
            assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                         grpc.StatusCode.INVALID_ARGUMENT), info.value  # fmt: skip
        handshake = kvtransfer_pb2.HandshakeRequest(
            layout=kvtransfer_pb2.KVLayout(layout_version=1, dtype="float32", num_layers=2),
            compat_hash="not-ours",
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Handshake(handshake, timeout=10)
        assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                     grpc.StatusCode.INVALID_ARGUMENT), info.value  # fmt: skip
    up.wait_all_free("p0")


# --------------------------------------------------------------------------- fuzz

_junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                  st.lists(st.integers(-5, 400), max_size=4),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))  # fmt: skip
_small_int = st.one_of(st.integers(-3, 24), _junk)
_prob = st.one_of(st.floats(-1, 2), _junk)
_token_ids = st.lists(st.integers(-2, 400), min_size=0, max_size=24)
_common = {
    "model": st.one_of(st.just(MODEL_NAME), st.text(max_size=8), _junk),
    "max_tokens": _small_int,
    "temperature": _prob,
    "top_p": _prob,
    "top_k": _small_int,
    "min_p": _prob,
    "n": st.one_of(st.integers(-1, 20), _junk),
    "seed": st.one_of(st.integers(-(2**64), 2**64), _junk),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=3), max_size=20), _junk),
    "stop_token_ids": st.one_of(_token_ids, _junk),
    "presence_penalty": _prob,
    "frequency_penalty": _prob,
    "repetition_penalty": _prob,
    "logit_bias": st.one_of(
        st.dictionaries(st.text(max_size=6), st.floats(-200, 200), max_size=3), _junk
    ),  # fmt: skip
    "stream": st.one_of(st.booleans(), _junk),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), _junk),
    "ignore_eos": st.one_of(st.booleans(), _junk),
    "min_tokens": _small_int,
    "skip_special_tokens": st.one_of(st.booleans(), _junk),
    "user": _junk,
}
_text = st.text(max_size=40)  # includes NUL, lone surrogates, any unicode
# Well-formed bodies with edge values, so the fuzz reaches the workers and not only the schema.
_valid = {
    "max_tokens": st.integers(1, 6),
    "temperature": st.one_of(st.just(0.0), st.floats(0, 2)),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "n": st.integers(1, 3),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(
        st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)
    ),  # fmt: skip
    "stop_token_ids": st.lists(st.integers(0, 319), max_size=3),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(
        st.integers(0, 319).map(str), st.floats(-100, 100), max_size=3
    ),  # fmt: skip
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 3),
    "skip_special_tokens": st.booleans(),
}
_valid_prompt = st.one_of(_text.filter(bool), st.just(LONG_PROMPT),
                          st.lists(st.integers(0, 319), min_size=1, max_size=40),
                          st.lists(st.lists(st.integers(0, 319), min_size=1, max_size=8),
                                   min_size=1, max_size=2))  # fmt: skip
_valid_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                        "content": _text})  # fmt: skip
completion_bodies = st.one_of(
    st.fixed_dictionaries(
        {"prompt": _valid_prompt},
        optional={**_valid, "logprobs": st.integers(0, 5), "echo": st.booleans()},
    ),  # fmt: skip
    st.fixed_dictionaries(
        {
            "prompt": st.one_of(
                _text,
                st.just(LONG_PROMPT),
                _token_ids,
                st.lists(_token_ids, max_size=3),
                st.lists(_text, max_size=3),
                _junk,
            )
        },
        optional={
            **_common,
            "logprobs": _small_int,
            "echo": _junk,
            "suffix": _junk,
            "best_of": _small_int,
        },
    ),  # fmt: skip
    _junk,
)
_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), _text, _junk)},
    optional={"content": st.one_of(_text, st.lists(st.fixed_dictionaries(
        {"type": st.one_of(st.just("text"), _text), "text": _text}), max_size=2), _junk)},
)  # fmt: skip
chat_bodies = st.one_of(
    st.fixed_dictionaries(
        {"messages": st.lists(_valid_message, min_size=1, max_size=3)},
        optional={**_valid, "logprobs": st.booleans(), "max_completion_tokens": st.integers(1, 6)},
    ),  # fmt: skip
    st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(_message, max_size=3), _junk)},
        optional={
            **_common,
            "logprobs": _junk,
            "top_logprobs": _small_int,
            "max_completion_tokens": _small_int,
            "add_generation_prompt": _junk,
        },
    ),  # fmt: skip
    _junk,
)


def _encode(body) -> bytes:
    """JSON as a careless client writes it: NaN/Infinity literals and lone surrogates kept."""
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


def _server_errors(resp: httpx.Response) -> list[str]:
    """5xx statuses, and error chunks with a 5xx code inside a 200 stream."""
    if resp.status_code >= 500:
        return [f"{resp.status_code}: {resp.text[:300]}"]
    if not resp.headers.get("content-type", "").startswith("text/event-stream"):
        return []
    errors = []
    for line in resp.text.splitlines():
        if line.startswith("data: {") and '"error"' in line:
            error = json.loads(line[6:])["error"]
            if int(error.get("code") or 500) >= 500:
                errors.append(line[:300])
    return errors


_FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])  # fmt: skip
_FUZZ_STATS: dict[str, dict[int, int]] = {}


def _fuzz_one(up, route: str, body) -> None:
    url = f"{up.gateways['main'].url}{route}"
    resp = httpx.post(url, content=_encode(body), timeout=30,
                      headers={"Content-Type": "application/json"})  # fmt: skip
    stats = _FUZZ_STATS.setdefault(route, {})
    stats[resp.status_code] = stats.get(resp.status_code, 0) + 1
    assert not _server_errors(resp), (body, _server_errors(resp))
    if resp.status_code != 200:
        error = resp.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error), error


@_FUZZ
@given(body=completion_bodies)
def test_fuzz_completions_never_5xx(up, body):
    _fuzz_one(up, "/v1/completions", body)


@_FUZZ
@given(body=chat_bodies)
def test_fuzz_chat_completions_never_5xx(up, body):
    _fuzz_one(up, "/v1/chat/completions", body)


def test_after_the_battery_nothing_leaked_and_it_still_serves(up, figures):
    url = f"{up.gateways['main'].url}/v1/completions"
    resp = httpx.post(url, json={"prompt": LONG_PROMPT, "max_tokens": 4}, timeout=30)
    assert resp.status_code == 200
    up.wait_all_free()
    statuses: dict[int, int] = {}
    for per_route in _FUZZ_STATS.values():
        for status, count in per_route.items():
            statuses[status] = statuses.get(status, 0) + count
    figures["fuzz"] = {"requests": sum(statuses.values()), "statuses": statuses,
                       "status_5xx": sum(c for s, c in statuses.items() if s >= 500),
                       "blocks_leaked": 0}  # fmt: skip
    assert not math.isnan(sum(statuses.values()))


def test_grpc_front_door_refuses_bad_requests_with_status_codes(up):
    gateway = up.gateways["small"]
    bad = [
        gateway_pb2.GenerateRequest(text="a" * (5 * 2**20)),  # over gRPC's 4 MiB message cap
        gateway_pb2.GenerateRequest(text=""),
        gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIdList(ids=[2**31])),
        gateway_pb2.GenerateRequest(text="hi", params=gateway_pb2.GenerationParams(n=0)),
        gateway_pb2.GenerateRequest(text="hi",
                                    params=gateway_pb2.GenerationParams(temperature=math.nan)),
        gateway_pb2.GenerateRequest(text="hi", params=gateway_pb2.GenerationParams(
            max_tokens=10**6)),  # over the context
        gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatPrompt()),  # no messages
        gateway_pb2.GenerateRequest(request_id="x" * 100_000, text="hi"),
    ]  # fmt: skip
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        codes = [_generate_status(stub, request) for request in bad]
        allowed = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
        assert not [c for c in codes if c[0] not in allowed], [
            c for c in codes if c[0] not in allowed
        ]
        ok = list(
            stub.Generate(
                gateway_pb2.GenerateRequest(
                    text=LONG_PROMPT, params=gateway_pb2.GenerationParams(max_tokens=3)
                ),
                timeout=30,
            )
        )
        assert sum(len(m.token_ids) for m in ok) == 3
    up.wait_all_free("p0", "d1")


def _generate_status(stub, request, metadata=None) -> tuple[str, str]:
    try:
        replies = list(stub.Generate(request, timeout=30, metadata=metadata))
    except grpc.RpcError as exc:
        return exc.code().name, (exc.details() or "")[:120]
    return "OK", f"{len(replies)} replies"


def test_api_key_guards_the_grpc_front_door_too(tmp_path):
    """With --api-key the gRPC Gateway service wants the same key as /v1/* (metadata
    `authorization: Bearer KEY`); health stays open. Fake workers: no cluster needed."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from test_gateway_fakes import (
        REPLY,
        FakeWorker,
        GatewayHarness,
        build_tiny_model_folder,
        make_config,
    )

    from gateway.tokenizer import GatewayTokenizer
    from pdserve.client import GatewayCallError, GatewayClient

    folder = build_tiny_model_folder(tmp_path)
    tok = GatewayTokenizer(folder)
    prefill = FakeWorker("prefill", tok.encode(REPLY), tok.eos_token_ids[0]).start()
    decode = FakeWorker("decode", tok.encode(REPLY), tok.eos_token_ids[0]).start()
    harness = GatewayHarness(make_config(folder, [prefill], [decode], api_key="s3cret"))
    try:
        request = gateway_pb2.GenerateRequest(text="hi")
        with grpc.insecure_channel(harness.grpc_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            for metadata in (None, [("authorization", "Bearer wrong")],
                             [("authorization", "s3cret")]):  # fmt: skip
                assert _generate_status(stub, request, metadata)[0] == "UNAUTHENTICATED"
            ok = _generate_status(stub, request, [("authorization", "Bearer s3cret")])
            assert ok[0] == "OK", ok
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with GatewayClient(harness.grpc_address, timeout=30, api_key="s3cret") as client:
            assert client.generate("hi").text
        with GatewayClient(harness.grpc_address, timeout=30) as client:
            with pytest.raises(GatewayCallError) as info:
                client.generate("hi")
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        harness.close()
        prefill.stop()
        decode.stop()
