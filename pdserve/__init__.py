"""pdserve: LLM serving with disaggregated prefill and decode."""

import os

__version__ = "0.1.0"

# CPU inference shares few cores between processes (prefill and decode workers, clients):
# OpenMP threads that spin while waiting make every process several times slower when
# another one is busy. Sleeping waiters cost little when alone. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name):
    # Lazy, so `import pdserve` (CLI, gateway client) does not import torch.
    if name == "LLM":
        from pdserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
