"""The compiled CPU path: a C++ extension built on first use and cached on disk.

Built with torch's own extension builder (g++ and ninja), with -O3 -march=native, into
~/.cache/pdserve/cpu-ext/<key>, where the key covers the source, the torch version and install
folder, and this CPU's instruction-set flags, so a restart loads the built library in
milliseconds and a different machine (or torch) builds its own. The folder matters: torch's
builder writes the include paths into build.ninja, so two environments sharing one key would
overwrite each other's build file and rebuild on every start. The first build takes about a minute on two cores
and says so on stderr.
"""

from __future__ import annotations

import fcntl
import hashlib
import sys
import threading
import time
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "pdserve_cpu.cpp"
_lock = threading.Lock()
_module = None


def default_build_dir() -> Path:
    return Path.home() / ".cache" / "pdserve" / "cpu-ext"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build_key() -> str:
    h = hashlib.sha256()
    h.update(_SOURCE.read_bytes())
    h.update(torch.__version__.encode())
    h.update(str(Path(torch.__file__).resolve().parent).encode())
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def load(build_dir: Path | None = None):
    """The compiled module (builds it once per source/torch/CPU). Raises RuntimeError if no
    C++ toolchain is available."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        from torch.utils import cpp_extension

        target = (build_dir or default_build_dir()) / build_key()
        target.mkdir(parents=True, exist_ok=True)
        fresh = not any(target.glob("*.so"))
        if fresh:
            print(
                f"[pdserve] compiling the CPU kernels into {target} (once; about a minute)...",
                file=sys.stderr,
                flush=True,
            )
        t0 = time.perf_counter()
        # One process builds; others (workers started together) wait here, then load the result.
        with open(target / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _module = _build(cpp_extension, target)
        if fresh:
            print(
                f"[pdserve] CPU kernels built in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        return _module


def _build(cpp_extension, target: Path):
    try:
        return cpp_extension.load(
            name="pdserve_cpu",
            sources=[str(_SOURCE)],
            build_directory=str(target),
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        raise RuntimeError(
            f"cannot build pdserve's CPU kernels ({exc}); install g++ and ninja, "
            "or run with --enforce-eager"
        ) from exc
