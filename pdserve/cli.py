"""The `pdserve` command line: one subcommand per module in `pdserve.commands`.

Each command module exposes `add_parser(subparsers)` and `run(args) -> int | None`.
Modules are imported lazily so `pdserve gateway --help` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module, help). `bench` has its own sub-subcommands.
COMMANDS: list[tuple[str, str, str]] = [
    ("serve", "pdserve.commands.serve", "start a local cluster (gateway + prefill + decode)"),
    ("prefill", "pdserve.commands.prefill", "run a prefill worker"),
    ("decode", "pdserve.commands.decode", "run a decode worker"),
    ("both", "pdserve.commands.both", "run a worker in both roles (prefill and decode)"),
    ("gateway", "pdserve.commands.gateway", "run the gateway (gRPC + OpenAI HTTP routes)"),
    ("generate", "pdserve.commands.generate", "offline generation with the LLM API"),
    ("convert", "pdserve.commands.convert", "convert the default GGUF model to a HF folder"),
]
BENCH_COMMANDS: list[tuple[str, str, str]] = [
    ("throughput", "pdserve.commands.bench_throughput", "offline throughput vs transformers"),
    ("serve", "pdserve.commands.bench_serve", "load-test an OpenAI-compatible endpoint"),
    ("sweep", "pdserve.bench.sweep", "request-rate sweep: disaggregated vs aggregated"),
    ("compare", "pdserve.commands.bench_compare", "same workloads vs a baseline server, ratios"),
    ("routing", "pdserve.bench.routing", "shared-prefix routing: kv-aware vs round-robin"),
    ("sizing", "pdserve.bench.sizing", "prefill:decode workers for a load, from profiles"),
    ("speculative", "pdserve.commands.bench_speculative", "tok/s with and without speculation"),
]


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # Only import the module that is asked for (keeps `--help` of light commands light).
    wanted = argv[0] if argv else None
    for name, module, help_text in COMMANDS:
        mod = _load(module) if name == wanted else None
        p = sub.add_parser(name, help=help_text)
        if mod is not None:
            mod.add_parser(p)
            p.set_defaults(_run=mod.run)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, module, help_text in BENCH_COMMANDS:
        want = wanted == "bench" and len(argv) > 1 and argv[1] == name
        mod = _load(module) if want else None
        p = bench_sub.add_parser(name, help=help_text)
        if mod is not None:
            mod.add_parser(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.error(f"command {argv[0]!r} is not available in this build")
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
