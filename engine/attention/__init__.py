"""Attention backends behind one seam (see base.py)."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """'auto' picks Triton on CUDA and torch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        try:
            from engine.attention.triton_backend import TritonAttentionBackend
        except ImportError as exc:
            raise ValueError(f"the triton attention backend is unavailable: {exc}") from exc
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch or triton")
