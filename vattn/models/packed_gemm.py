"""Linear layers against weights packed once for the GEMM kernel (CPU, float32).

A matrix product spends part of its time laying the weight's panels out for the kernel, on every call; with few
activation rows (a decode batch of 128 tokens against a 512 x 3072 weight) that repacking is a large share of it.
MKL, inside torch's x86 CPU build, can pack a weight once (cblas_sgemm_pack) and multiply by the packed copy
(cblas_sgemm_compute) for any number of rows. `pack_model` gives every linear layer of a loaded CPU float32 model a
packed copy, and the layers' forward uses it; the weight itself stays (state, tied embeddings, other dtypes).

Off when the fused-ops extension does not build, on a torch without those MKL routines, or with VATTN_PACKED_GEMM=0.
The packed product computes what F.linear computes; only the order of the sums may differ (float32 rounding).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from vattn.models import cpu_layers


def available() -> bool:
    """Whether weights can be packed here: the switch is on and the extension built with MKL's routines."""
    if os.environ.get("VATTN_PACKED_GEMM", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return cpu_layers.available() and cpu_layers.EXTENSION.require().packed_gemm_available()


def can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2 and weight.numel() > 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] (float32, CPU) in MKL's packed layout: an opaque buffer, valid only at its own address."""
    return cpu_layers.EXTENSION.require().pack_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the packed weight when there is one and x is a float32 CPU matrix."""
    if packed is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    cpu_layers.EXTENSION.require().packed_linear(out, x, packed, bias)
    return out


class Linear(nn.Linear):
    """nn.Linear whose forward multiplies by its packed weight once `pack_model` has given it one."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def pack_model(model: nn.Module) -> int:
    """Give every layer with a `packed` slot (Linear and the tensor-parallel linears) a packed copy of its weight;
    call after the weights are loaded. Returns how many were packed (0 when packing is unavailable here)."""
    if not available():
        return 0
    layers = [m for m in model.modules() if hasattr(type(m), "packed") and can_pack(m.weight)]
    for m in layers:
        m.packed = pack(m.weight)
    return len(layers)
