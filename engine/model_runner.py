"""Runs the model on one scheduled step: flat batch, slot mapping, block tables, KV pool."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, get_backend
from engine.model_loader import LoadedModel
from engine.scheduler import SchedulerOutput

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

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run one step; returns (S, vocab) logits for the requests that sample, in schedule order."""
        input_ids, positions, meta, logits_idx = self._prepare(sched)
        return self.model(input_ids, positions, self.kv_cache, meta, self.backend, logits_idx)

    def _prepare(self, sched: SchedulerOutput):
        bs = self.block_size
        starts = np.array([s.request.num_computed_tokens for s in sched.scheduled], dtype=np.int64)
        qlens = np.array([s.num_new_tokens for s in sched.scheduled], dtype=np.int64)
        ctx = starts + qlens
        cu = np.zeros(len(qlens) + 1, dtype=np.int64)
        np.cumsum(qlens, out=cu[1:])
        # Positions of every new token, flat: start_b + (0..qlen_b-1).
        seq_of_token = np.repeat(np.arange(len(qlens)), qlens)
        positions = starts[seq_of_token] + (np.arange(cu[-1]) - cu[:-1][seq_of_token])
        max_blocks = int(-(-ctx.max() // bs))
        tables = np.zeros((len(qlens), max_blocks), dtype=np.int32)
        tokens = np.empty(cu[-1], dtype=np.int64)
        for b, s in enumerate(sched.scheduled):
            ids = s.request.block_ids[: -(-int(ctx[b]) // bs)]
            tables[b, : len(ids)] = ids
            tokens[cu[b] : cu[b + 1]] = s.request.all_token_ids[starts[b] : ctx[b]]
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        logits_idx = [cu[b + 1] - 1 for b, s in enumerate(sched.scheduled) if s.samples]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(tables).to(dev),
            context_lens=torch.from_numpy(ctx.astype(np.int32)).to(dev),
            query_lens=torch.from_numpy(qlens.astype(np.int32)).to(dev),
            cu_seqlens_q=torch.from_numpy(cu.astype(np.int32)).to(dev),
            max_query_len=int(qlens.max()),
            max_context_len=int(ctx.max()),
        )
        return (
            torch.from_numpy(tokens).to(dev),
            torch.from_numpy(positions).to(dev),
            meta,
            torch.tensor(logits_idx, dtype=torch.long, device=dev),
        )
