"""Fused CPU layer ops (csrc/cpu_layers.cpp): RMSNorm, residual add + RMSNorm, in-place rotary embedding, and the
greedy sampler's row argmax.

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


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x [T, 2I]: one fused pass for float32, torch's two ops otherwise."""
    gate, up = x.chunk(2, dim=-1)
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        return torch.nn.functional.silu(gate) * up
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    EXTENSION.require().silu_mul(out, x)
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=1) for a CPU [rows, V] tensor: our vector kernel for float32 when built, else torch's."""
    if x.dim() != 2 or x.shape[1] == 0 or x.dtype != torch.float32 or x.device.type != "cpu" or not available():
        return x.argmax(dim=1)
    if x.shape[1] == 1:  # one column (its stride may be anything): index 0, NaN or not
        return torch.zeros(x.shape[0], dtype=torch.long)
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    EXTENSION.require().argmax(out, x)
    return out
