"""pdserve: LLM serving with disaggregated prefill and decode."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import pdserve` (CLI, gateway client) does not import torch.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
