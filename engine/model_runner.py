"""Runs the model on one scheduled step: flat batch, slot mapping, block tables, KV pool."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from engine import cpu
from engine.attention import AttentionMetadata, get_backend
from engine.cpu.fused_forward import FusedCPUForward
from engine.input_batch import InputBatch
from engine.model_loader import LoadedModel
from engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 2 << 30  # 2 GiB: enough for SmolLM2 at 64 x 700 tokens


@dataclass(slots=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """All layers, K and V, of one block."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize


def kv_pool_bytes(
    device: torch.device, kv_cache_memory: int | None, utilization: float, weights_bytes: int
) -> int:
    """Bytes for the KV pool: explicit size, else a fraction of free accelerator memory, else 2 GiB on CPU."""
    if kv_cache_memory is not None:
        return kv_cache_memory
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(total * utilization) - (total - free) - weights_bytes // 8)
    return int(_CPU_DEFAULT_KV_BYTES * utilization / 0.9)


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        spec_without_blocks: dict,
        kv_bytes: int,
        device: torch.device,
        attention_backend: str,
        enforce_eager: bool = False,
        max_num_seqs: int = 64,
        max_model_len: int = 4096,
    ) -> None:
        self.model = loaded.model
        self.device = device
        self.block_size = spec_without_blocks["block_size"]
        probe = KVCacheSpec(num_blocks=1, **spec_without_blocks)
        num_blocks = kv_bytes // probe.bytes_per_block
        if num_blocks < 2:
            raise ValueError(
                f"KV cache budget of {kv_bytes} bytes holds {num_blocks} blocks "
                f"({probe.bytes_per_block} bytes each); raise kv_cache_memory"
            )
        self.spec = KVCacheSpec(num_blocks=num_blocks, **spec_without_blocks)
        # (L, 2, N, bs, Hkv, D): one block of one layer's K (or V) is one contiguous range.
        self.kv_cache = torch.zeros(
            self.spec.num_layers,
            2,
            num_blocks,
            self.block_size,
            self.spec.num_kv_heads,
            self.spec.head_dim,
            dtype=self.spec.dtype,
            device=device,
        )
        self.backend = get_backend(attention_backend, device)
        self.input_batch = InputBatch(
            max_rows=max(2 * max_num_seqs, 8),
            max_blocks_per_seq=-(-max_model_len // self.block_size) + 1,
            block_size=self.block_size,
        )
        # The compiled forward: CPU, float32, torch attention (auto) and not --enforce-eager.
        self.fused = None
        if (
            not enforce_eager
            and device.type == "cpu"
            and self.spec.dtype == torch.float32
            and self.backend.name == "torch"
        ):
            self.fused = _try_fused(self.model)

    def describe(self) -> str:
        if self.fused is not None:
            return "fused CPU forward (compiled, paged attention in place)"
        return f"eager forward, {self.backend.name} attention"

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run one step; returns (S, vocab) logits for the requests that sample, in schedule order."""
        input_ids, positions, meta, logits_idx = self._prepare(sched)
        if self.fused is not None:
            return self.fused(input_ids, positions, self.kv_cache, meta, logits_idx)
        return self.model(input_ids, positions, self.kv_cache, meta, self.backend, logits_idx)

    def _prepare(self, sched: SchedulerOutput):
        a = self.input_batch.prepare(sched)
        dev = self.device

        def put(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x).to(dev)

        meta = AttentionMetadata(
            slot_mapping=put(a.slot_mapping),
            block_tables=put(a.block_tables),
            context_lens=put(a.context_lens),
            query_lens=put(a.query_lens),
            cu_seqlens_q=put(a.cu_seqlens_q),
            max_query_len=int(a.query_lens.max()),
            max_context_len=int(a.context_lens.max()),
        )
        return put(a.input_ids), put(a.positions), meta, put(a.logits_indices)


def _try_fused(model) -> FusedCPUForward | None:
    """The compiled forward, or None (with a warning) where it cannot run on this machine."""
    try:
        if not cpu.load().has_packed_matmul():
            log.warning("this CPU has neither AVX-512 nor AVX2 with FMA: running the eager forward")
            return None
        return FusedCPUForward(model)
    except RuntimeError as exc:
        log.warning("running the eager forward: %s", exc)
        return None
