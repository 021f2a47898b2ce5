"""Generate Python code from the .proto files under protos/pdserve/v1.

    python -m protos.generate           # regenerate *_pb2.py, *_pb2.pyi, *_pb2_grpc.py in place
    python -m protos.generate --check   # regenerate into a temp dir; exit 1 on any difference

Protos are compiled with `-I <repo root>`, so generated imports read
`from protos.pdserve.v1 import common_pb2`. Generated code is committed and never edited by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos") / "pdserve" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
PACKAGE_DIRS = (Path("protos"), Path("protos") / "pdserve", PROTO_DIR)


def proto_files() -> list[Path]:
    """The .proto files, relative to the repo root, sorted."""
    return sorted(p.relative_to(REPO_ROOT) for p in (REPO_ROOT / PROTO_DIR).glob("*.proto"))


def generated_files(directory: Path) -> list[Path]:
    """Generated files under `directory`/PROTO_DIR, relative to `directory`, sorted."""
    out = directory / PROTO_DIR
    if not out.is_dir():
        return []
    found = (p for p in out.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
    return sorted(p.relative_to(directory) for p in found)


def run_protoc(out_dir: Path) -> None:
    """Compile every proto into `out_dir` (which mirrors the repo root)."""
    from grpc_tools import protoc

    protos = [str(p) for p in proto_files()]
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    well_known = str(resources.files("grpc_tools") / "_proto")
    argv = [
        "grpc_tools.protoc",
        "-I.",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    # protoc resolves -I and the proto paths against the working directory.
    with contextlib.chdir(REPO_ROOT):
        rc = protoc.main(argv)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


def ensure_package_files(root: Path) -> None:
    for package in PACKAGE_DIRS:
        init = root / package / "__init__.py"
        init.parent.mkdir(parents=True, exist_ok=True)
        if not init.exists():
            init.write_text("")


def generate() -> list[Path]:
    """Regenerate in place, removing generated files whose .proto is gone."""
    for stale in generated_files(REPO_ROOT):
        (REPO_ROOT / stale).unlink()
    ensure_package_files(REPO_ROOT)
    run_protoc(REPO_ROOT)
    return generated_files(REPO_ROOT)


def check() -> list[str]:
    """Differences between the committed generated code and a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        (fresh_root / PROTO_DIR).mkdir(parents=True)
        run_protoc(fresh_root)
        fresh = set(generated_files(fresh_root))
        committed = set(generated_files(REPO_ROOT))
        problems = [f"missing: {p}" for p in sorted(fresh - committed)]
        problems += [f"stale (no .proto): {p}" for p in sorted(committed - fresh)]
        for path in sorted(fresh & committed):
            if not filecmp.cmp(fresh_root / path, REPO_ROOT / path, shallow=False):
                problems.append(f"differs: {path}")
    for package in PACKAGE_DIRS:
        if not (REPO_ROOT / package / "__init__.py").exists():
            problems.append(f"missing: {package / '__init__.py'}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("generated code is stale: run `python -m protos.generate`", file=sys.stderr)
            return 1
        print(f"generated code is up to date ({len(proto_files())} protos)")
        return 0
    for path in generate():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
