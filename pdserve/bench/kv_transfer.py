"""KV transfer throughput, with two baselines measured on the same bytes in the same run.

    python -m pdserve.bench.kv_transfer --tokens 1024 --repeats 7 --output-json kv_bench.json
    python -m pdserve.bench.kv_transfer --sweep            # chunk sizes x streams, bare stream and KV gRPC

A child process (`... serve`) serves, on one gRPC server on 127.0.0.1, the KVTransferService over
a random pool (with a lease on the prompt's blocks) and a bare byte-stream service; this process
pulls the blocks into its own pool with each transport. Each round times, in turn:

  memcpy          torch `copy_` of the same number of bytes into an already-touched buffer
                  (torch's intra-op threads: 2 here)
  memcpy_1thread  the same copy by one thread (context: the transports copy with one thread)
  copies          the shared-memory path's two checksummed copies (pool -> buffer -> pool),
                  with no transport
  bare_grpc       a bare grpcio stream of raw byte chunks (generic handler, bytes in and out, no
                  protobuf, no checksum, no KV logic), same chunk size and number of streams
  grpc            KVTransferClient.pull over ReadBlocks (packed chunks, CRC-32 checked, written
                  into the pool)
  shm             KVTransferClient.pull over ReadBlocksShm (gather into a pooled segment, CRC-32,
                  copy into the pool, CRC-32 checked)

Rounds interleave the paths, so load from other processes hits them alike; ratios are taken per
round (grpc / bare_grpc, shm / memcpy) and their median reported. The default layout is the
default model's (SmolLM2-135M: 30 layers, 3 KV heads, head dim 64, float32, block 16: 12 KiB
pages); `--shape` picks another, `--layers` etc. override single fields.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time

import grpc
import torch

from kvtransfer.checksum import IMPLEMENTATION as CRC_IMPLEMENTATION
from kvtransfer.chunking import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES
from kvtransfer.client import KVTransferClient
from kvtransfer.exporter import KVExporter, WorkerIdentity
from kvtransfer.layout import KVLayout
from kvtransfer.lease import LeaseConfig, LeaseTable
from kvtransfer.pages import PagedKV
from kvtransfer.service import KVTransferServicer, add_to_server
from kvtransfer.shm import ShmExporter, host_id

TRANSFER_ID = "bench"
EPOCH = 1
BARE_METHOD = "/pdserve.bench.Bare/Stream"
_MAX_MESSAGE = 8 << 20
OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
]

SHAPES = {  # layers, kv heads, head dim, dtype
    "smollm2-135m": (30, 3, 64, "float32"),  # the default model
    "llama3-8b": (32, 8, 128, "bfloat16"),
}

TARGETS = {"shm_vs_memcpy": 0.5, "grpc_vs_bare_grpc": 0.8}


def layout_from_args(args: argparse.Namespace, num_blocks: int) -> KVLayout:
    return KVLayout(
        model_fingerprint="bench",
        dtype=args.dtype,
        num_layers=args.layers,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        num_blocks=num_blocks,
    )


def random_pool(layout: KVLayout) -> torch.Tensor:
    shape = (
        layout.num_layers,
        2,
        layout.num_blocks,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
    )
    return torch.randn(shape).to(getattr(torch, layout.dtype))


# -- the child: KV service + bare byte stream --------------------------------------------------


def bare_handler(total_bytes: int) -> grpc.GenericRpcHandler:
    """A stream of raw byte chunks: request = (chunk size, bytes wanted, first byte) as three
    little-endian uint64; responses are bytes taken from a buffer as large as the transfer
    (prepared once per chunk size, so the stream itself copies nothing), serialized as they are."""
    prepared: dict[int, list[bytes]] = {}

    def chunks_of(size: int) -> list[bytes]:
        if size not in prepared:
            prepared.clear()
            blob = os.urandom(min(size, 1 << 20)) * (-(-total_bytes // min(size, 1 << 20)) + 1)
            prepared[size] = [blob[i : i + size] for i in range(0, total_bytes, size)]
        return prepared[size]

    async def stream(request: bytes, context):
        size, wanted, start = struct.unpack("<QQQ", request)
        chunks = chunks_of(size)
        first = start // size
        sent = 0
        for chunk in chunks[first:]:
            if sent >= wanted:
                break
            await context.write(chunk)
            sent += len(chunk)

    return grpc.method_handlers_generic_handler(
        "pdserve.bench.Bare", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )


async def serve(args: argparse.Namespace) -> None:
    blocks = args.tokens // args.block_size
    layout = layout_from_args(args, blocks + 8)
    paged = PagedKV(random_pool(layout), layout)
    shm = ShmExporter()
    leases = LeaseTable(
        lambda lease, reason: exporter.drop_attachments(lease),
        LeaseConfig(default_ms=3_600_000, max_ms=3_600_000),
    )
    exporter = KVExporter(paged, leases, WorkerIdentity("bench-server", EPOCH, host_id()), shm)
    for i in range(args.leases):
        leases.grant(f"{TRANSFER_ID}{i}", list(range(blocks)))
    server = grpc.aio.server(options=OPTIONS)
    add_to_server(server, KVTransferServicer(exporter))
    nbytes = layout.num_layers * 2 * blocks * layout.page_bytes
    server.add_generic_rpc_handlers((bare_handler(nbytes),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    # Commands on stdin: "release <transfer id>" (the reader is done: its segment goes back to
    # the pool, and a fresh lease on the same blocks replaces it); EOF stops us.
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd, _, transfer_id = line.strip().partition(" ")
        if cmd == "release":
            leases.release(transfer_id)
            leases.grant(transfer_id, list(range(blocks)))
            print("ok", flush=True)
    await server.stop(0)
    leases.close()
    shm.close()


# -- the parent: timings -----------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, child: subprocess.Popen, port: int) -> None:
        self.args = args
        self.child = child
        self.port = port
        self.blocks = args.tokens // args.block_size
        self.layout = layout_from_args(args, self.blocks + 8)
        self.nbytes = self.layout.num_layers * 2 * self.blocks * self.layout.page_bytes
        src = torch.randint(0, 255, (self.nbytes,), dtype=torch.uint8)
        self._copy = (src, torch.empty_like(src))
        self._copy[1].copy_(src)  # touch the destination
        self._src = PagedKV(random_pool(self.layout), self.layout)
        self._dst = PagedKV(torch.zeros_like(random_pool(self.layout)), self.layout)
        self._buf = torch.zeros(self.nbytes, dtype=torch.uint8)  # touched
        self._dst.scatter(*self._all(), self._src.gather(*self._all()))  # touch

    def _all(self) -> tuple[list[int], list[int]]:
        return list(range(self.layout.num_layers)), list(range(self.blocks))

    def memcpy(self) -> float:
        src, dst = self._copy
        t = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t

    def memcpy_1thread(self) -> float:
        """The same bytes copied by one thread (a plain memcpy through memoryviews)."""
        src, dst = self._copy
        s, d = memoryview(src.numpy()), memoryview(dst.numpy())
        t = time.perf_counter()
        d[:] = s
        return time.perf_counter() - t

    def copies(self) -> float:
        """The shared-memory path's two checksummed copies (pool -> buffer -> pool), alone."""
        layers, ids = self._all()
        buf = memoryview(self._buf.numpy())
        t = time.perf_counter()
        crc = self._src.copy_out(layers, ids, buf)
        ok = self._dst.copy_in(layers, ids, buf) == crc
        elapsed = time.perf_counter() - t
        assert ok
        return elapsed

    async def open(self, chunk_bytes: int, streams: int) -> None:
        self.chunk_bytes, self.streams = chunk_bytes, streams
        target = f"127.0.0.1:{self.port}"
        self._channels = [grpc.aio.insecure_channel(target, OPTIONS) for _ in range(1)]
        self._bare = self._channels[0].unary_stream(BARE_METHOD)
        local = PagedKV(torch.zeros_like(random_pool(self.layout)), self.layout)
        self._clients = {
            transport: KVTransferClient(
                target,
                local,
                local_host_id=host_id(),
                transport=transport,
                max_chunk_bytes=chunk_bytes,
                streams=streams,
                shm_pieces=self.args.shm_pieces,
            )
            for transport in ("grpc", "shm")
        }

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        for client in self._clients.values():
            await client.close()

    async def bare_grpc(self) -> float:
        per = self.nbytes // self.streams

        async def one(i: int) -> int:
            wanted = self.nbytes - per * i if i == self.streams - 1 else per
            request = struct.pack("<QQQ", self.chunk_bytes, wanted, per * i)
            n = 0
            async for msg in self._bare(request):
                n += len(msg)
            return n

        t = time.perf_counter()
        got = await asyncio.gather(*(one(i) for i in range(self.streams)))
        elapsed = time.perf_counter() - t
        assert sum(got) >= self.nbytes, (sum(got), self.nbytes)
        return elapsed

    async def pull(self, transport: str) -> float:
        ids = list(range(self.blocks))
        transfer_id = f"{TRANSFER_ID}0"
        result = await self._clients[transport].pull(transfer_id, EPOCH, ids, ids)
        assert result.transport == transport and result.num_bytes == self.nbytes
        if transport == "shm":  # as a decode worker does: release, so the segment is reused
            await asyncio.get_running_loop().run_in_executor(None, self._release, transfer_id)
        return result.seconds

    def _release(self, transfer_id: str) -> None:
        self.child.stdin.write(f"release {transfer_id}\n")  # type: ignore[union-attr]
        self.child.stdin.flush()  # type: ignore[union-attr]
        assert self.child.stdout.readline().strip() == "ok"  # type: ignore[union-attr]


async def run_rounds(bench: Bench, paths: list[str], rounds: int) -> dict[str, list[float]]:
    calls = {
        "memcpy": lambda: _sync(bench.memcpy),
        "memcpy_1thread": lambda: _sync(bench.memcpy_1thread),
        "copies": lambda: _sync(bench.copies),
        "bare_grpc": bench.bare_grpc,
        "grpc": lambda: bench.pull("grpc"),
        "shm": lambda: bench.pull("shm"),
    }
    for path in paths:  # warm-up: handshakes, channels, segments, prepared chunks
        await calls[path]()
    times: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(rounds):
        for path in paths:
            times[path].append(await calls[path]())
    return times


async def _sync(fn) -> float:
    return fn()


def summarize(nbytes: int, times: dict[str, list[float]]) -> dict:
    rows = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        rows[name] = {
            "median_s": median,
            "best_s": min(ts),
            "gb_per_s": nbytes / median / 1e9,
            "best_gb_per_s": nbytes / min(ts) / 1e9,
        }
    ratios = {}
    pairs = {
        "shm_vs_memcpy": ("shm", "memcpy"),
        "grpc_vs_bare_grpc": ("grpc", "bare_grpc"),
        "shm_vs_memcpy_1thread": ("shm", "memcpy_1thread"),
    }
    for key, (a, b) in pairs.items():
        if a in times and b in times:
            per_round = [tb / ta for ta, tb in zip(times[a], times[b], strict=True)]
            ratios[key] = {
                "median": statistics.median(per_round),
                "min": min(per_round),
                "max": max(per_round),
            }
            if key in TARGETS:
                ratios[key]["target"] = TARGETS[key]
                ratios[key]["met"] = statistics.median(per_round) >= TARGETS[key]
    if "memcpy" in times:
        memcpy = statistics.median(times["memcpy"])
        for row in rows.values():
            row["vs_memcpy"] = memcpy / row["median_s"]
    return {"results": rows, "ratios": ratios}


async def measure(args, child, port) -> dict:
    bench = Bench(args, child, port)
    report: dict = {}
    if args.sweep:
        sweep = []
        for streams in args.sweep_streams:
            for chunk in args.sweep_chunks:
                await bench.open(chunk, streams)
                paths = ["bare_grpc"] + (["grpc"] if chunk <= MAX_CHUNK_BYTES else [])
                times = await run_rounds(bench, paths, args.repeats)
                await bench.close()
                row = summarize(bench.nbytes, times)
                row.update(chunk_bytes=chunk, streams=streams)
                sweep.append(row)
                _print_sweep_row(row)
        report["sweep"] = sweep
    else:
        await bench.open(args.chunk_bytes, args.streams)
        paths = ["memcpy", "memcpy_1thread", "copies", "bare_grpc", "grpc", "shm"]
        times = await run_rounds(bench, paths, args.repeats)
        await bench.close()
        report.update(summarize(bench.nbytes, times))
        report["times_s"] = times
    report.update(
        layout={
            "layers": bench.layout.num_layers,
            "kv_heads": bench.layout.num_kv_heads,
            "head_dim": bench.layout.head_dim,
            "block_size": bench.layout.block_size,
            "dtype": bench.layout.dtype,
            "page_bytes": bench.layout.page_bytes,
        },
        tokens=args.tokens,
        bytes=bench.nbytes,
        repeats=args.repeats,
        chunk_bytes=args.chunk_bytes,
        streams=args.streams,
        shm_pieces=args.shm_pieces,
        crc32=CRC_IMPLEMENTATION,
        torch_threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        load_average=os.getloadavg(),
        python=platform.python_version(),
        grpc=grpc.__version__,
        torch=torch.__version__,
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pdserve.bench.kv_transfer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "serve"))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7, help="measured rounds (after a warm-up)")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--shm-pieces", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="chunk sizes x streams instead")
    parser.add_argument(
        "--sweep-chunks",
        type=lambda s: [int(x) << 10 for x in s.split(",")],
        default=[k << 10 for k in (256, 512, 1024, 2048, 4096)],
        help="KiB, comma-separated (KV gRPC only up to its 1 MiB cap)",
    )
    parser.add_argument(
        "--sweep-streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4]
    )
    parser.add_argument("--leases", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--output-json", "--out", dest="output_json", default=None)
    args = parser.parse_args(argv)
    layers, heads, dim, dtype = SHAPES[args.shape]
    args.layers = args.layers or layers
    args.kv_heads = args.kv_heads or heads
    args.head_dim = args.head_dim or dim
    args.dtype = args.dtype or dtype
    if args.mode == "serve":
        asyncio.run(serve(args))
        return 0
    child = subprocess.Popen(
        [sys.executable, "-m", "pdserve.bench.kv_transfer", "serve", *_forward(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        report = asyncio.run(measure(args, child, port))
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if not args.sweep:
        _print_table(report)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _forward(args: argparse.Namespace) -> list[str]:
    return [
        "--tokens", str(args.tokens), "--layers", str(args.layers), "--kv-heads", str(args.kv_heads),
        "--head-dim", str(args.head_dim), "--block-size", str(args.block_size), "--dtype", args.dtype,
    ]  # fmt: skip


def _print_table(report: dict) -> None:
    lay = report["layout"]
    print(
        f"{report['bytes'] / 1e6:.1f} MB ({report['tokens']} tokens; {lay['layers']} layers, "
        f"{lay['kv_heads']} KV heads, head dim {lay['head_dim']}, {lay['dtype']}, block "
        f"{lay['block_size']}: {lay['page_bytes']} B pages); chunk {report['chunk_bytes'] >> 10} "
        f"KiB x {report['streams']} stream(s); {report['repeats']} rounds; crc32 "
        f"{report['crc32']}; load {report['load_average'][0]:.1f}"
    )
    print(f"{'path':<16}{'median ms':>10}{'GB/s':>8}{'best GB/s':>11}{'vs memcpy':>11}")
    for name, row in report["results"].items():
        print(
            f"{name:<16}{row['median_s'] * 1e3:>10.2f}{row['gb_per_s']:>8.2f}"
            f"{row['best_gb_per_s']:>11.2f}{row.get('vs_memcpy', float('nan')):>11.2f}"
        )
    for key, r in report["ratios"].items():
        target = (
            f", target >= {r['target']:.2f}: {'met' if r['met'] else 'NOT met'}"
            if "target" in r
            else ""
        )
        print(f"{key}: median {r['median']:.2f} (rounds {r['min']:.2f}-{r['max']:.2f}){target}")


def _print_sweep_row(row: dict) -> None:
    res = row["results"]
    ratio = row["ratios"].get("grpc_vs_bare_grpc", {}).get("median")
    print(
        f"chunk {row['chunk_bytes'] >> 10:>5} KiB x {row['streams']} stream(s): bare "
        f"{res['bare_grpc']['gb_per_s']:.2f} GB/s"
        + (f", KV grpc {res['grpc']['gb_per_s']:.2f} GB/s, ratio {ratio:.2f}" if ratio else ""),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
