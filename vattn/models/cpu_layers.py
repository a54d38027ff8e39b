"""Fused CPU layer ops (csrc/cpu_layers.cpp): RMSNorm, residual add + RMSNorm, in-place rotary embedding.

Each replaces several plain-torch ops (and their temporaries) with one pass over memory; the decoder uses them on
CPU when the extension builds, and the plain-torch expressions otherwise (`available()` says which). Both compute the
same thing: tests/test_cpu_layers.py checks each op against its torch expression.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vattn.cpp_extension import CppExtension

EXTENSION = CppExtension("vattn_cpu_layers", Path(__file__).parent / "csrc" / "cpu_layers.cpp", "fused CPU layer ops",
                         "plain torch ops", extra_flags=("-ffp-contract=off",))


def available() -> bool:
    return EXTENSION.available()


def use_for(x: torch.Tensor) -> bool:
    """Whether the fused ops serve this tensor: on CPU, in a dtype they know, once the extension is built."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    EXTENSION.require().rms_norm(out, x, weight, eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x, then x = RMSNorm(residual) * weight."""
    EXTENSION.require().add_rms_norm(x, residual, weight, eps)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on x [T, heads, D] (any token/head strides): x * cos + rotate_half(x) * sin; cos/sin [T, D]."""
    EXTENSION.require().rope(x, cos, sin)
    return x
