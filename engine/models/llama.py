"""Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Checkpoint names follow Hugging Face's. Projections are fused at load time (q/k/v into one
matmul, gate/up into another): fewer, larger matmuls are what a CPU and a GPU both like.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata


@dataclass(slots=True)
class LlamaArgs:
    """The fields of a transformers config that the module needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: bias on q/k/v
    qk_norm: bool  # Qwen3: RMSNorm on q and k per head

    @classmethod
    def from_hf_config(cls, config, architecture: str) -> LlamaArgs:
        head_dim = getattr(config, "head_dim", None)
        head_dim = head_dim or config.hidden_size // config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=architecture == "Qwen2ForCausalLM"
            or bool(getattr(config, "attention_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Low precision: normalise in fp32, round, then scale (transformers' order of operations).
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions (HF's rope types via inv_freq)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int) -> None:
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())  # (P, hd/2)
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1)  # (T, 1, hd/2)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's "rotate_half" convention: the two halves of head_dim form the complex pairs.
    x1, x2 = x.float().chunk(2, dim=-1)  # (T, H, hd/2) each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.scale = args.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        positions: torch.Tensor,  # (T,)
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, kv_heads, head_dim)
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # (T, nh, hd)
        k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        backend.write_kv(k, v, kv_cache[0], kv_cache[1], meta)
        out = backend.forward(q, kv_cache[0], kv_cache[1], meta, self.scale)  # (T, nh, hd)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, positions, rotary, kv_cache, meta, backend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = rotary

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        kv_cache: torch.Tensor,  # (L, 2, num_blocks, block_size, kv_heads, head_dim)
        meta: AttentionMetadata,
        backend: AttentionBackend,
        logits_indices: torch.Tensor,  # (S,) rows whose next-token logits are needed
    ) -> torch.Tensor:  # (S, vocab) float32
        x = self.embed_tokens(input_ids)  # (T, hidden)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, self.rotary, kv_cache[i], meta, backend)
        x = self.norm(x[logits_indices])  # only the rows we sample from reach the lm_head
        return self.lm_head(x).float()

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up. Raises ValueError on a mismatch."""
        own = {}
        for i in range(self.args.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            own[attn + "qkv_proj.weight"] = [
                attn + n + ".weight" for n in ("q_proj", "k_proj", "v_proj")
            ]
            if self.args.attention_bias:
                own[attn + "qkv_proj.bias"] = [
                    attn + n + ".bias" for n in ("q_proj", "k_proj", "v_proj")
                ]
            own[mlp + "gate_up_proj.weight"] = [mlp + "gate_proj.weight", mlp + "up_proj.weight"]
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        for name, param in params.items():
            hf_name = "model." + name if not name.startswith("lm_head") else name
            sources = own.get(hf_name, [hf_name])
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            if name == "lm_head.weight" and "lm_head.weight" not in tensors:
                sources = ["model.embed_tokens.weight"]  # checkpoints that omit a tied head
            missing = [s for s in sources if s not in tensors]
            if missing:
                raise ValueError(f"checkpoint is missing weights {missing[:3]}")
            value = (
                torch.cat([tensors[s] for s in sources], dim=0)
                if len(sources) > 1
                else tensors[sources[0]]
            )
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"weight {name}: checkpoint shape {tuple(value.shape)} != {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(value)
            loaded.add(name)
