import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pdserve/__init__.py; before torch loads

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when it is imported (transformers may import it): without a GPU
# its kernels run under the interpreter, so set it before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
# Tests live in one folder per package (engine_tests/, gateway_tests/, ...) and share helpers
# across them (test_gateway_fakes, test_kvtransfer_service, ...): every folder is importable by
# module name, whatever order pytest collects them in. Test module names are unique.
for _folder in sorted(Path(__file__).parent.glob("*_tests")):
    sys.path.insert(1, str(_folder))

from tiny_models import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[tuple, Path] = {}

    def make(arch: str = "LlamaForCausalLM", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(arch.lower())
            cache[key] = save_tiny_model(path, arch, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("LlamaForCausalLM")

# Workers and gateways started from the CLI need a cluster secret (rpc/auth.py); tests that start
# them as subprocesses pass this one on through the environment.
os.environ.setdefault("PDSERVE_CLUSTER_SECRET", "test-cluster-secret-0123456789")
