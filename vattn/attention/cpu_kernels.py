"""Our batched CPU attention kernel (csrc/cpu_attention.cpp), in two twins: over the contiguous cache and over paged pools.

One C++ call per layer per step attends a whole ragged batch (prefill, chunked prefill and decode mixed, bottom-right
causal, GQA) on torch's intra-op threads, reading only positions below each sequence's context length; optionally it
writes the step's K/V first (the fused write). The two twins differ only in where key n of sequence b lives:

    contiguous  row = slots[b],                 position n            (cache [max_num_seqs, L, Hk, D], any strides)
    paged       row = block_tables[b, n // P],  position n % P        (pools [num_blocks, P, Hk, D])

The extension is compiled with torch.utils.cpp_extension.load the first time it is needed (needs a C++ compiler and
ninja, a dependency) into a cache directory keyed by the source (and the shared vattn/csrc/ headers), the flags,
Python, torch and the CPU's vector capability: $VATTN_KERNEL_CACHE, else ~/.cache/vattn/kernels. Build it ahead with

    python -m vattn.attention.cpu_kernels --build

When the build fails, `available()` is False after one warning that says why, and "auto" falls back to the
per-sequence torch paths.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from vattn.cpp_extension import CppExtension

SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
EXTENSION = CppExtension("vattn_cpu_attention", SOURCE, "CPU attention kernel", "per-sequence torch attention",
                         extra_flags=("-ffp-contract=fast",))


def build_directory() -> Path:
    """Where the compiled module lives: one directory per (source, flags, Python, torch, CPU capability)."""
    return EXTENSION.build_directory()


def load(verbose: bool = False):
    """The compiled module (built on first use), or None after one warning when it cannot be built here."""
    return EXTENSION.load(verbose)


def available() -> bool:
    """Whether the kernel is built (building it now if needed)."""
    return EXTENSION.available()


def build_error() -> str | None:
    """Why the last build failed, or None."""
    return EXTENSION.error


def contiguous_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         context_lens: torch.Tensor, cu_query_lens: torch.Tensor, scale: float,
                         out: torch.Tensor | None = None, k_new: torch.Tensor | None = None,
                         v_new: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] over caches [S, L, Hk, D] (any strides, contiguous last axis); sequence b in row slots[b].

    slots, context_lens: int32 [B]; cu_query_lens: int32 [B+1]. With k_new/v_new [T, Hk, D], the step's tokens are
    first written at cache[slots[b], ctx_b - qlen_b + j]. Returns out [T, H, D] (allocated when None).
    """
    out = torch.empty_like(q) if out is None else out
    EXTENSION.require().attention(out, q, k_cache, v_cache, slots, context_lens, cu_query_lens, 0, float(scale),
                              k_new, v_new)
    return out


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_query_lens: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, k_new: torch.Tensor | None = None,
                    v_new: torch.Tensor | None = None) -> torch.Tensor:
    """The twin: q [T, H, D] over pools [N, P, Hk, D]; key n of sequence b in block block_tables[b, n // P].

    block_tables: int32 [B, W] (entries past a sequence's last block are never read). With k_new/v_new the step's
    tokens are first written through the table at positions ctx_b - qlen_b + j.
    """
    out = torch.empty_like(q) if out is None else out
    EXTENSION.require().attention(out, q, k_pool, v_pool, block_tables, context_lens, cu_query_lens, k_pool.shape[1],
                              float(scale), k_new, v_new)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vattn.attention.cpu_kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--build", action="store_true", help="compile our CPU kernels now (make install runs this)")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = ap.parse_args(argv)
    if not args.build:
        ap.print_help()
        return 0
    from vattn.models import cpu_layers

    status = 0
    for ext in (EXTENSION, cpu_layers.EXTENSION):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = ext.load(verbose=args.verbose) is not None
        if ok:
            print(f"vattn {ext.what} ready in {ext.build_directory()}")
        else:
            print(f"vattn {ext.what} could not be built ({ext.fallback} will be used): {ext.error}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
