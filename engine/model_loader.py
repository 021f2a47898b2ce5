"""Load a local Hugging Face folder: config via transformers, weights via safetensors (mmap)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from engine.models import MODEL_REGISTRY, SUPPORTED_ARCHITECTURES
from engine.models.llama import LlamaArgs, LlamaForCausalLM, RotaryEmbedding


@dataclass(slots=True)
class LoadedModel:
    model: LlamaForCausalLM
    hf_config: object
    architecture: str
    fingerprint: str  # stable id of architecture + config + weight files
    num_params: int


def load_hf_config(path: Path):
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    arch = next((a for a in archs if a in MODEL_REGISTRY), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs or '(none)'} in {path}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config, arch


def load_model(
    path: Path, dtype: torch.dtype, device: torch.device, max_positions: int
) -> LoadedModel:
    config, arch = load_hf_config(path)
    args = LlamaArgs.from_hf_config(config, arch)
    with torch.device("meta"):
        model = MODEL_REGISTRY[arch](args, rotary=None)
    model = model.to_empty(device=device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_hf_state_dict(_read_safetensors(path))
    model = model.to(dtype).eval()
    model.rotary = _rotary(config, args, max_positions).to(device)  # tables stay fp32
    model.requires_grad_(False)
    num_params = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, config, arch, _fingerprint(path, arch), num_params)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _rotary(config, args: LlamaArgs, max_positions: int) -> RotaryEmbedding:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (
            base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)
        )
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return RotaryEmbedding(inv_freq, scaling, max_positions)


def _fingerprint(path: Path, arch: str) -> str:
    h = hashlib.sha256(arch.encode())
    h.update(json.dumps(json.loads((path / "config.json").read_text()), sort_keys=True).encode())
    for file in sorted(path.glob("*.safetensors")):
        h.update(file.name.encode())
        h.update(str(file.stat().st_size).encode())
        with file.open("rb") as f:
            h.update(f.read(1 << 16))
    return h.hexdigest()[:32]


def model_folder(model: str | os.PathLike[str] | None) -> Path:
    """The local Hugging Face folder `model` names, checked. The engine loads folders only:
    the default model is converted by whoever starts the engine (`pdserve.default_model`)."""
    if model is None or os.fspath(model).strip() == "":
        raise ValueError(
            "the engine needs a local Hugging Face model folder (pdserve.default_model."
            "resolve_model turns None or the default model's name into one)"
        )
    path = Path(os.fspath(model)).expanduser()
    if not path.is_dir():
        raise ValueError(f"model path {path} is not a folder (expected a local HF model folder)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {path} has no config.json (is it a HF model folder?)")
    return path.resolve()
