"""Rotary position embedding (rotate-half convention, as in HF Llama-family checkpoints)."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", scaling: dict | None = None) -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies; `llama3` rescales the low frequencies (Llama 3.1)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"rope_type {rope_type!r} is not supported")
    s = scaling or {}
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between blended
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for a step's positions once; every layer applies them to its q and k."""

    def __init__(self, head_dim: int, theta: float, rope_type: str = "default", scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.rope_type, self.scaling = head_dim, theta, rope_type, scaling
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, rope_type, scaling), persistent=False)

    def reset(self, device: torch.device | str) -> None:
        """Recompute the float32 buffer on `device` (after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.rope_type, self.scaling).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, 1, head_dim] in `dtype` (computed in float32)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim] -> x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
