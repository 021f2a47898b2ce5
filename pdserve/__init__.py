"""pdserve: LLM serving with disaggregated prefill and decode."""

import os

__version__ = "0.1.0"

# CPU inference shares few cores between processes (prefill and decode workers, clients).
# OpenMP waiters that spin without bound make every process several times slower when another
# one is busy; waiters that sleep at once pay a wake-up on each of a decode step's ~150
# parallel regions (a third of a batch-1 step here). A short bounded spin (about tens of
# microseconds) catches the next region of the same step and then sleeps: measured in
# docs/benchmarks.md. Must be set before torch loads; the user's own settings win.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ["GOMP_SPINCOUNT"] = "20000"


def __getattr__(name):
    # Lazy, so `import pdserve` (CLI, gateway client) does not import torch.
    if name == "LLM":
        from pdserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from contract.structured import StructuredOutputs

        return StructuredOutputs
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "__version__"]
