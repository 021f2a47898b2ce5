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


PACKAGES = ["contract", "engine", "kvtransfer", "rpc", "worker", "gateway", "pdserve"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports (type-checking-only imports included: a cycle there is
    still two files that each need the other)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for package in PACKAGES for p in modules(package)}
    known = set(paths)
    return {name: _imported_modules(path, known) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_worker_role_imports_the_other():
    graph = import_graph()
    assert "worker.decode" not in graph["worker.prefill"]
    assert "worker.prefill" not in graph["worker.decode"]
    assert "worker.prefill" not in graph["worker.importer"]
