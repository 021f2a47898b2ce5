"""The Llama-family forward as one compiled call on CPU (the counterpart of a captured graph).

The eager module (engine/models/llama.py) stays the reference; this runs the same math over the
same weights with no per-op Python dispatch: per layer one fused RMSNorm (+ residual), the qkv
matmul, in-place RoPE, the KV write, paged attention reading blocks in place, o_proj, fused
residual + RMSNorm, gate/up matmul, SiLU*mul, down matmul. The matmuls run on weights packed into
panels once at load (see csrc).
No shapes are baked in, so one build serves every batch size: nothing to capture per bucket.
"""

from __future__ import annotations

import torch

from engine import cpu
from engine.attention.base import AttentionMetadata
from engine.models.llama import LlamaForCausalLM

_EMPTY = torch.empty(0)


class FusedCPUForward:
    def __init__(self, model: LlamaForCausalLM) -> None:
        if model.embed_tokens.weight.dtype != torch.float32:
            raise ValueError("the fused CPU forward runs float32 weights only")
        self._ext = cpu.load()
        self.args = model.args
        self.cos = model.rotary.cos.contiguous()
        self.sin = model.rotary.sin.contiguous()
        self.weights = _flatten_weights(model, self._ext.pack_weight)

    def __call__(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        kv_cache: torch.Tensor,  # (L, 2, N, bs, Hkv, D)
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # (S,) int64
    ) -> torch.Tensor:  # (S, vocab)
        return self._ext.forward(
            input_ids,
            positions,
            meta.slot_mapping,
            meta.block_tables,
            meta.context_lens,
            meta.cu_seqlens_q,
            logits_indices,
            kv_cache,
            self.weights,
            self.cos,
            self.sin,
            self.args.num_heads,
            self.args.intermediate_size,
            self.args.vocab_size,
            self.args.rms_norm_eps,
        )


def _flatten_weights(model: LlamaForCausalLM, pack) -> list[torch.Tensor]:
    """Nine tensors per layer (empty where the model has none), then embed, final norm, lm_head;
    matmul weights packed into panels (a second copy: the eager module keeps its own).

    The order is the C++ side's contract (kPerLayer in csrc/pdserve_cpu.cpp).
    """
    out: list[torch.Tensor] = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [
            layer.input_layernorm.weight,
            pack(attn.qkv_proj.weight.detach()),
            attn.qkv_proj.bias if attn.qkv_proj.bias is not None else _EMPTY,
            attn.q_norm.weight if attn.q_norm is not None else _EMPTY,
            attn.k_norm.weight if attn.k_norm is not None else _EMPTY,
            pack(attn.o_proj.weight.detach()),
            layer.post_attention_layernorm.weight,
            pack(mlp.gate_up_proj.weight.detach()),
            pack(mlp.down_proj.weight.detach()),
        ]
    out += [
        model.embed_tokens.weight,
        model.norm.weight,
        pack(model.lm_head.weight.detach()),
    ]
    return [w.detach().contiguous() for w in out]  # the C++ side reads raw pointers
