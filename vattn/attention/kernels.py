"""The attention kernels of each KV layout and how "auto" picks one: the one list that config, cli and backends read.

Imports nothing heavy at module level (the cli builds its --help from KERNELS without loading torch).

    vattention  cpu          our batched C++ kernel (vattn.attention.cpu_kernels): one call per layer per step
                sdpa         torch SDPA per sequence on views cache[slot, :ctx] (any device)
                torch_flash  torch's FlashAttention-2, varlen over the cache (CUDA sm80+, fp16/bf16)
                flash_attn   the flash-attn package (same needs)
                triton       our Triton kernel's contiguous twin (CUDA, or TRITON_INTERPRET=1 on CPU)
    paged       cpu          the C++ kernel's paged twin (rows found through the block table)
                torch        gather each sequence's blocks, then SDPA per sequence (any device)
                triton       our Triton paged kernel (CUDA, or TRITON_INTERPRET=1)
                flash_attn   flash-attn's paged path (CUDA, block_size a multiple of 256)

"auto": on CUDA flash_attn > torch_flash > sdpa (vattention) and triton (paged); on CPU the "cpu" kernel, or the
per-sequence torch path when the C++ kernel cannot be built here (after one warning saying why).
"""

from __future__ import annotations

import os

KERNELS: dict[str, tuple[str, ...]] = {
    "vattention": ("auto", "cpu", "sdpa", "torch_flash", "flash_attn", "triton"),
    "paged": ("auto", "cpu", "torch", "triton", "flash_attn"),
}
CPU_KERNEL_DTYPES = ("float32", "bfloat16", "float16")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def torch_flash_supported(device, dtype, head_dim: int) -> bool:
    import torch

    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def _cpu_kernel_usable(device, dtype) -> str | None:
    """None when the C++ kernel can run these tensors here, else why not."""
    if device.type != "cpu":
        return f"it runs on CPU tensors, not {device.type}"
    if str(dtype).removeprefix("torch.") not in CPU_KERNEL_DTYPES:
        return f"it supports {CPU_KERNEL_DTYPES}, not {dtype}"
    from vattn.attention import cpu_kernels

    if not cpu_kernels.available():
        return f"it could not be built: {cpu_kernels.build_error()}"
    return None


def choose_kernel(layout: str, kernel: str, device, dtype, head_dim: int, block_size: int | None = None) -> str:
    """Resolve "auto" for `layout` ("vattention" or "paged"); check that an explicit choice can run here."""
    if layout not in KERNELS:
        raise ValueError(f"layout must be one of {tuple(KERNELS)}, got {layout!r}")
    if kernel not in KERNELS[layout]:
        raise ValueError(f"kernel for the {layout} layout must be one of {KERNELS[layout]}, got {kernel!r}")
    if kernel == "auto":
        if device.type == "cuda":
            if layout == "paged":
                return "triton"
            if not torch_flash_supported(device, dtype, head_dim):
                return "sdpa"
            return "flash_attn" if flash_attn_available() else "torch_flash"
        if device.type == "cpu" and _cpu_kernel_usable(device, dtype) is None:
            return "cpu"
        return "sdpa" if layout == "vattention" else "torch"
    if kernel == "cpu":
        why = _cpu_kernel_usable(device, dtype)
        if why is not None:
            raise ValueError(f"kernel 'cpu' cannot be used: {why}")
    elif kernel == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernel 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    elif kernel == "torch_flash" or (kernel == "flash_attn" and layout == "vattention"):
        if not torch_flash_supported(device, dtype, head_dim):
            raise ValueError(f"kernel {kernel!r} needs a CUDA sm80+ device, fp16/bf16 and head_dim % 8 == 0 <= 256")
    if kernel == "flash_attn":
        if device.type != "cuda":
            raise ValueError("kernel 'flash_attn' needs a CUDA device")
        if layout == "paged" and (block_size is None or block_size % 256):
            raise ValueError(f"kernel 'flash_attn' needs block_size a multiple of 256, got {block_size}")
        if not flash_attn_available():
            raise ValueError("kernel 'flash_attn' requested but `import flash_attn` fails")
    return kernel
