"""`pdserve serve`: a local cluster (prefill + decode workers and a gateway) on this machine."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from pathlib import Path

from contract.generation_config import AUTO, VLLM, generation_config_folder
from contract.limits import MAX_LOGPROBS
from engine.cli_args import add_engine_args
from pdserve.commands.convert import add_cache_dir_arg
from pdserve.commands.gateway import add_generation_config_arg, add_served_name_arg, add_tool_args
from pdserve.launcher import (
    DECODE_PORT,
    GATEWAY_API_KEY_ENV,
    GATEWAY_GRPC_PORT,
    GATEWAY_HTTP_PORT,
    PREFILL_PORT,
    ClusterOptions,
    RestartPolicy,
    RunOptions,
    plan_cluster,
    run_cluster,
)
from rpc.sampling import add_max_logprobs_arg

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DRAIN_MARGIN_S = 5.0  # extra wait past a child's own drain timeout before SIGKILL


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="HF model folder, as `vllm serve MODEL` (or give --model)")  # fmt: skip
    add_engine_args(p)  # passed on to every worker
    g = p.add_argument_group("cluster")
    g.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    g.add_argument("--port", type=int, default=GATEWAY_HTTP_PORT, help="gateway HTTP port")
    g.add_argument("--grpc-port", type=int, default=GATEWAY_GRPC_PORT, help="gateway gRPC port")
    g.add_argument("--num-prefill", type=int, default=1)
    g.add_argument("--num-decode", type=int, default=1)
    g.add_argument("--aggregated", action="store_true",
                   help="no prefill workers: decode workers prefill locally")  # fmt: skip
    g.add_argument("--prefill-port", type=int, default=PREFILL_PORT, help="first prefill port")
    g.add_argument("--decode-port", type=int, default=DECODE_PORT, help="first decode port")
    g.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to get healthy")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds each child may drain after SIGTERM (then SIGKILL)")  # fmt: skip
    g.add_argument("--max-restarts", type=int, default=5,
                   help="restarts of one child within --restart-window before the cluster stops")  # fmt: skip
    g.add_argument(
        "--restart-window", type=float, default=60.0, help="seconds (see --max-restarts)"
    )
    g.add_argument("--cluster-secret-file", type=Path, default=None,
                   help="the secret gateway and workers share (default: a new random one per run)")  # fmt: skip
    add_cache_dir_arg(g)
    g.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    gw = p.add_argument_group("gateway")
    add_served_name_arg(gw)
    add_generation_config_arg(gw)
    gw.add_argument("--tokenizer", default=None,
                    help="HF folder with the tokenizer files and chat template the gateway uses "
                    "(default: the model's)")  # fmt: skip
    add_max_logprobs_arg(gw)  # the gateway and every worker enforce it
    gw.add_argument("--api-key", default=os.environ.get(GATEWAY_API_KEY_ENV) or None,
                    help=f"require 'Authorization: Bearer KEY' (or set {GATEWAY_API_KEY_ENV})")  # fmt: skip
    gw.add_argument("--chat-template", default=None, help="a template file or the template text")
    gw.add_argument("--router", default=None, choices=("round-robin", "least-loaded", "kv-aware"),
                    help="the gateway's routing policy (default kv-aware)")  # fmt: skip
    add_tool_args(gw)


def engine_flag_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags the user changed, spelled for a child command line (model excluded)."""
    reference = argparse.ArgumentParser(add_help=False)
    add_engine_args(reference)
    argv: list[str] = []
    for action in reference._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest == "model" or value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0 if value else 1])  # --x / --no-x
        elif action.nargs == 0:
            argv.append(action.option_strings[0])
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def spell_choice(command: str, flag: str, value: str) -> str:
    """`value` as `pdserve <command> <flag>` spells it among its choices (case differs)."""
    parser = argparse.ArgumentParser(add_help=False)
    importlib.import_module(f"pdserve.commands.{command}").add_parser(parser)
    for action in parser._actions:
        if flag in action.option_strings and action.choices is not None:
            for choice in action.choices:
                if str(choice).lower() == value.lower():
                    return str(choice)
    return value


def gateway_flag_argv(args: argparse.Namespace) -> list[str]:
    """Gateway flags given to `serve` (the API key travels in the environment instead)."""
    argv: list[str] = []
    if args.served_model_name:
        argv += ["--served-model-name", *args.served_model_name]
    if args.max_logprobs != MAX_LOGPROBS:
        argv += ["--max-logprobs", str(args.max_logprobs)]
    if args.generation_config != AUTO:
        argv += ["--generation-config", args.generation_config]
    for flag, value in (
        ("--tokenizer", args.tokenizer),
        ("--chat-template", args.chat_template),
        ("--max-model-len", args.max_model_len),
        ("--router", getattr(args, "router", None)),
        ("--tool-call-parser", args.tool_call_parser),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.enable_auto_tool_choice:
        argv.append("--enable-auto-tool-choice")
    return argv


def worker_flag_argv(args: argparse.Namespace) -> list[str]:
    """Flags of `serve` every worker gets besides the engine's."""
    if args.max_logprobs == MAX_LOGPROBS:
        return []
    return ["--max-logprobs", str(args.max_logprobs)]


def model_argument(args: argparse.Namespace) -> str | None:
    """MODEL (positional, as vLLM) or --model; both given must agree."""
    tag, flag = args.model_tag, args.model
    if tag is not None and flag is not None and tag != flag:
        raise ValueError(f"MODEL {tag!r} and --model {flag!r} differ: give one")
    return tag if tag is not None else flag


def resolve_model(model: str | None, cache_dir: str | None) -> Path:
    """The HF folder every child gets (the default model is converted here, once)."""
    from pdserve.default_model import resolve_model as resolve

    return resolve(model, cache_dir)


def cluster_options(args: argparse.Namespace, model: Path) -> ClusterOptions:
    extra = {}
    if args.cluster_secret_file is not None:
        extra["cluster_secret"] = args.cluster_secret_file.read_text().strip()
    return ClusterOptions(
        **extra,
        model=str(model),
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        num_prefill=args.num_prefill,
        num_decode=args.num_decode,
        aggregated=args.aggregated,
        prefill_port=args.prefill_port,
        decode_port=args.decode_port,
        worker_log_level=spell_choice("decode", "--log-level", args.log_level),
        gateway_log_level=spell_choice("gateway", "--log-level", args.log_level),
        drain_timeout_s=args.drain_timeout,
        worker_args=tuple(engine_flag_argv(args) + worker_flag_argv(args)),
        gateway_args=tuple(gateway_flag_argv(args)),
        api_key=args.api_key,
    )


def banner(opts: ClusterOptions, served_name: str, api_key: str | None) -> str:
    request = {"model": served_name, "prompt": "The capital of France is", "max_tokens": 16}
    body = json.dumps(request)
    auth = " -H 'Authorization: Bearer <your --api-key>'" if api_key else ""
    mode = "aggregated" if opts.aggregated else f"{len(opts.prefill_ports)}P+{opts.num_decode}D"
    return (
        f"ready ({mode}): OpenAI API at {opts.base_url}/v1, model {served_name!r}\n"
        f"  curl {opts.base_url}/v1/completions -H 'Content-Type: application/json'{auth}"
        f" -d {shlex.quote(body)}"
    )


def run(args: argparse.Namespace) -> int:
    try:
        args.model = model_argument(args)
        if args.tokenizer is not None:
            if not Path(args.tokenizer).expanduser().is_dir():
                raise ValueError(f"--tokenizer {args.tokenizer!r} is not a folder")
            args.tokenizer = str(Path(args.tokenizer).expanduser().resolve())
        if args.generation_config not in (AUTO, VLLM):  # a folder, checked here
            folder = generation_config_folder(args.generation_config, model_folder=".")
            args.generation_config = str(folder.resolve())  # as --tokenizer: absolute
        if not 0 <= args.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"--max-logprobs must be in [0, {MAX_LOGPROBS}], got {args.max_logprobs}"
            )
        model = resolve_model(args.model, args.cache_dir)
        opts = cluster_options(args, model)
        RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window)
    except (ValueError, OSError) as exc:
        print(f"pdserve serve: error: {exc}", file=sys.stderr)
        return 2
    served = args.served_model_name[0] if args.served_model_name else model.name
    run_opts = RunOptions(
        ready_timeout_s=args.ready_timeout,
        grace_s=args.drain_timeout + DRAIN_MARGIN_S,
        banner=banner(opts, served, args.api_key),
        restart=RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window),
    )
    return run_cluster(plan_cluster(opts), run_opts)
