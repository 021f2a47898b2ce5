"""KV transfer throughput against a plain memory copy of the same bytes.

    python -m kvtransfer.bench --tokens 2048 --repeats 5 --out kv_bench.json

A KV service runs in a child process (`... serve`) over a random pool with a lease on the
prompt's blocks; this process pulls those blocks into its own pool with each transport, and
times, on the same bytes:
  - memcpy: one contiguous tensor copy (the floor);
  - gather+scatter: the page gather and scatter the transfer does, without any transport;
  - grpc: ReadBlocks over 127.0.0.1 (1 MiB chunks, CRC-32 checked) + scatter;
  - shm: ReadBlocksShm through /dev/shm (CRC-32 checked) + scatter.
Layout defaults are a Llama-3-8B-like page (32 layers, 8 KV heads, head dim 128, bf16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import grpc
import torch

from kvtransfer.client import KVTransferClient
from kvtransfer.exporter import KVExporter, WorkerIdentity
from kvtransfer.layout import KVLayout
from kvtransfer.lease import LeaseConfig, LeaseTable
from kvtransfer.pages import PagedKV
from kvtransfer.service import KVTransferServicer, add_to_server
from kvtransfer.shm import ShmExporter, host_id

TRANSFER_ID = "bench"
EPOCH = 1


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


async def serve(args: argparse.Namespace) -> None:
    blocks = args.tokens // args.block_size
    layout = layout_from_args(args, blocks + 8)
    paged = PagedKV(random_pool(layout), layout)
    leases = LeaseTable(
        lambda lease, reason: None, LeaseConfig(default_ms=3_600_000, max_ms=3_600_000)
    )
    leases.grant(TRANSFER_ID, list(range(blocks)))
    exporter = KVExporter(
        paged, leases, WorkerIdentity("bench-server", EPOCH, host_id()), ShmExporter()
    )
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 << 20)])
    add_to_server(server, KVTransferServicer(exporter))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    # The parent closes our stdin to stop us.
    stopped = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    # Segments pile up under the never-released lease; the client reads one at a time, so all
    # but the newest are done with.
    while not stopped.done():
        await asyncio.sleep(0.05)
        lease = leases.get(TRANSFER_ID)
        for old in lease.attachments[:-1]:
            exporter.shm.drop(old.name)  # type: ignore[union-attr, attr-defined]
        del lease.attachments[:-1]
    await server.stop(0)
    exporter.shm.close()  # type: ignore[union-attr]


def time_memcpy(nbytes: int, repeats: int) -> list[float]:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return times


def time_gather_scatter(layout: KVLayout, blocks: int, repeats: int) -> list[float]:
    src = PagedKV(random_pool(layout), layout)
    dst = PagedKV(torch.zeros_like(random_pool(layout)), layout)
    layers, ids = list(range(layout.num_layers)), list(range(blocks))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.scatter(layers, ids, src.gather(layers, ids))
        times.append(time.perf_counter() - t)
    return times


async def time_pulls(port: int, layout: KVLayout, blocks: int, transport: str, repeats: int):
    local = PagedKV(torch.zeros(
        (layout.num_layers, 2, layout.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim),
        dtype=getattr(torch, layout.dtype),
    ), layout)  # fmt: skip
    client = KVTransferClient(
        f"127.0.0.1:{port}", local, local_host_id=host_id(), transport=transport
    )
    ids = list(range(blocks))
    await client.pull(TRANSFER_ID, EPOCH, ids, ids)  # warm-up (handshake, channel)
    times = []
    for _ in range(repeats):
        result = await client.pull(TRANSFER_ID, EPOCH, ids, ids)
        times.append(result.seconds)
    await client.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtransfer.bench", description=__doc__)
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "serve"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        asyncio.run(serve(args))
        return 0
    blocks = args.tokens // args.block_size
    layout = layout_from_args(args, blocks + 8)
    nbytes = layout.num_layers * 2 * blocks * layout.page_bytes
    child = subprocess.Popen(
        [sys.executable, "-m", "kvtransfer.bench", "serve", *_forward(args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        results = {
            "memcpy": time_memcpy(nbytes, args.repeats),
            "gather+scatter": time_gather_scatter(layout, blocks, args.repeats),
            "grpc": asyncio.run(time_pulls(port, layout, blocks, "grpc", args.repeats)),
            "shm": asyncio.run(time_pulls(port, layout, blocks, "shm", args.repeats)),
        }
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    report = _report(args, layout, nbytes, results)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _forward(args: argparse.Namespace) -> list[str]:
    return [
        "--tokens", str(args.tokens), "--layers", str(args.layers), "--kv-heads", str(args.kv_heads),
        "--head-dim", str(args.head_dim), "--block-size", str(args.block_size), "--dtype", args.dtype,
    ]  # fmt: skip


def _report(args, layout: KVLayout, nbytes: int, results: dict[str, list[float]]) -> dict:
    memcpy = statistics.median(results["memcpy"])
    rows = {}
    for name, times in results.items():
        median = statistics.median(times)
        rows[name] = {
            "median_s": median,
            "best_s": min(times),
            "gb_per_s": nbytes / median / 1e9,
            "best_gb_per_s": nbytes / min(times) / 1e9,
            "vs_memcpy": memcpy / median,
        }
    return {
        "layout": {"layers": layout.num_layers, "kv_heads": layout.num_kv_heads,
                   "head_dim": layout.head_dim, "block_size": layout.block_size,
                   "dtype": layout.dtype, "page_bytes": layout.page_bytes},
        "tokens": args.tokens,
        "bytes": nbytes,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
