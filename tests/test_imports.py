"""The import direction of docs/internals.md, checked by reading every module's imports (ast,
nothing is imported):

    contract <- engine <- kvtransfer <- worker <- pdserve
    contract <- rpc <- (kvtransfer, worker, gateway)

`contract` is the standard library only; `rpc` is gRPC without torch or the engine; the gateway
uses `rpc`, the generated protos and tokenizer libraries, never torch, the engine or a worker."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

HTTP = {"fastapi", "starlette", "uvicorn", "aiohttp", "httpx", "flask"}
GRPC = {"grpc", "grpc_health", "grpc_reflection", "protos", "rpc"}
TORCH = {"torch", "triton", "numpy", "transformers", "tokenizers", "safetensors"}
FORBIDDEN: dict[str, set[str]] = {
    "contract": {"engine", "kvtransfer", "worker", "gateway", "pdserve", "google"}
    | GRPC
    | TORCH
    | HTTP,
    "engine": {"kvtransfer", "worker", "gateway", "pdserve"} | GRPC | HTTP,
    "kvtransfer": {"worker", "gateway", "pdserve", "transformers", "tokenizers"} | HTTP,
    "worker": {"gateway", "pdserve"} | HTTP,
    "rpc": {"engine", "kvtransfer", "worker", "gateway", "pdserve"} | TORCH | HTTP,
    "gateway": {"torch", "triton", "engine", "kvtransfer", "worker"},
    "protos": {"engine", "kvtransfer", "worker", "gateway", "pdserve", "rpc", "torch"},
}
# Nothing that turns bytes into code or objects may sit on a wire path.
WIRE_PACKAGES = ["contract", "kvtransfer", "rpc", "worker", "gateway", "protos"]
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle"}
UNSAFE_CALLS = {"eval", "exec"}


def modules(package: str) -> list[Path]:
    root = REPO / package
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
            # relative imports stay inside the package
        elif isinstance(node, ast.Call) and _called_name(node) in ("import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant):
                roots.add(str(node.args[0].value).split(".")[0])
    return roots


def _called_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    files = modules(package)
    assert files, f"{package}/ has no modules"
    bad = []
    for path in files:
        wrong = imported_roots(path) & FORBIDDEN[package]
        if wrong:
            bad.append(f"{path.relative_to(REPO)} imports {sorted(wrong)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", WIRE_PACKAGES)
def test_no_pickle_or_eval_on_wire_paths(package):
    bad = []
    for path in modules(package):
        tree = ast.parse(path.read_text(), filename=str(path))
        if imported_roots(path) & UNSAFE_MODULES:
            bad.append(
                f"{path.relative_to(REPO)} imports {sorted(imported_roots(path) & UNSAFE_MODULES)}"
            )
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in UNSAFE_CALLS:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} calls {node.func.id}()")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_and_dotted_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text(
        "import os.path\nfrom grpc import aio\n\ndef f():\n    import torch.nn\n"
        "    from . import sibling\n    importlib.import_module('fastapi.routing')\n"
    )
    assert imported_roots(sample) == {"os", "grpc", "torch", "fastapi"}
