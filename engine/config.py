"""Engine configuration: one dataclass, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

from engine.spec_decode.config import SpeculativeConfig

ATTENTION_BACKENDS = ("auto", "torch", "triton")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # local Hugging Face folder (required by LLMEngine)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # None: min(model's max positions, 4096)
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # on CPU: fraction of *available* RAM, capped (see runner)
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 2048  # token budget per step (chunked prefill splits prompts)
    max_waiting: int = 4096  # bounded waiting queue (admission control)
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto: triton on CUDA, torch on CPU
    seed: int = 0
    num_threads: int | None = (
        None  # torch intra-op threads for this engine's process; None: torch's default
    )
    # CPU: run the eager nn.Module forward instead of the compiled fused one (engine/cpu);
    # the eager path is the reference the fused one is tested against.
    enforce_eager: bool = False
    # Speculative decoding (vLLM's --speculative-config); a dict is converted. None: off.
    speculative_config: SpeculativeConfig | dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        elif self.speculative_config is not None and not isinstance(
            self.speculative_config, SpeculativeConfig
        ):
            raise ValueError(
                "speculative_config must be a SpeculativeConfig, a dict or None, got "
                f"{type(self.speculative_config).__name__}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
