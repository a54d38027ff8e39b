"""Our batched CPU attention kernel (csrc/cpu_attention.cpp), in two twins: over the contiguous cache and over paged pools.

One C++ call per layer per step attends a whole ragged batch (prefill, chunked prefill and decode mixed, bottom-right
causal, GQA) on torch's intra-op threads, reading only positions below each sequence's context length; optionally it
writes the step's K/V first (the fused write). The two twins differ only in where key n of sequence b lives:

    contiguous  row = slots[b],                 position n            (cache [max_num_seqs, L, Hk, D], any strides)
    paged       row = block_tables[b, n // P],  position n % P        (pools [num_blocks, P, Hk, D])

The extension is compiled with torch.utils.cpp_extension.load the first time it is needed (needs a C++ compiler and
ninja, a dependency) into a cache directory keyed by the source, the flags, Python, torch and the CPU's vector capability:
$VATTN_KERNEL_CACHE, else ~/.cache/vattn/kernels. Build it ahead with

    python -m vattn.attention.cpu_kernels --build

When the build fails, `available()` is False after one warning that says why, and "auto" falls back to the
per-sequence torch paths.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
_ARCH_FLAGS = {  # by torch's own view of the CPU, so the build runs wherever torch's vector kernels run
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_lock = threading.Lock()
_ext = None
_error: str | None = None


def _flags() -> list[str]:
    arch = _ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), []) if _is_x86() else []
    # -fopenmp makes at::parallel_for (inline, OpenMP in torch's CPU builds) run on torch's threads; the OpenMP
    # symbols resolve against the runtime torch already loaded, so torch.set_num_threads governs the kernel too.
    return ["-O3", "-ffp-contract=fast", "-fopenmp", *arch]


def _is_x86() -> bool:
    return sysconfig.get_platform().endswith(("x86_64", "amd64"))


def build_directory() -> Path:
    """Where the compiled module lives: one directory per (source, flags, Python, torch, CPU capability)."""
    root = Path(os.environ.get("VATTN_KERNEL_CACHE") or Path.home() / ".cache" / "vattn" / "kernels")
    return root / _module_name()


def _module_name() -> str:
    key = hashlib.sha1(SOURCE.read_bytes() + " ".join(_flags()).encode()).hexdigest()[:12]
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}_{torch.backends.cpu.get_cpu_capability()}"
    return re.sub(r"\W", "_", f"vattn_cpu_attention_{tag}_{key}").lower()


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the ninja wheel (a dependency) puts it next to this interpreter's scripts, which
    are not on PATH when the venv's python is run without activating the venv."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and scripts and os.path.exists(os.path.join(scripts, "ninja")):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def load(verbose: bool = False):
    """The compiled module (built on first use), or None after one warning when it cannot be built here."""
    global _ext, _error
    with _lock:
        if _ext is not None or _error is not None:
            return _ext
        try:
            from torch.utils.cpp_extension import load as cpp_load

            _put_ninja_on_path()
            build_dir = build_directory()
            build_dir.mkdir(parents=True, exist_ok=True)
            _ext = cpp_load(name=_module_name(), sources=[str(SOURCE)], extra_cflags=_flags(),
                            build_directory=str(build_dir), verbose=verbose)
        except Exception as e:  # no compiler, no ninja, a compile error: fall back, loudly, once
            _error = f"{type(e).__name__}: {str(e).strip()[-2000:]}"
            warnings.warn(f"vattn: the CPU attention kernel could not be built, falling back to per-sequence torch "
                          f"attention (slower). Reason: {_error}", RuntimeWarning, stacklevel=2)
        return _ext


def available() -> bool:
    """Whether the kernel is built (building it now if needed)."""
    return load() is not None


def build_error() -> str | None:
    """Why the last build failed, or None."""
    return _error


def _ext_or_raise():
    ext = load()
    if ext is None:
        raise RuntimeError(f"the CPU attention kernel is not available: {_error}")
    return ext


def contiguous_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         context_lens: torch.Tensor, cu_query_lens: torch.Tensor, scale: float,
                         out: torch.Tensor | None = None, k_new: torch.Tensor | None = None,
                         v_new: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] over caches [S, L, Hk, D] (any strides, contiguous last axis); sequence b in row slots[b].

    slots, context_lens: int32 [B]; cu_query_lens: int32 [B+1]. With k_new/v_new [T, Hk, D], the step's tokens are
    first written at cache[slots[b], ctx_b - qlen_b + j]. Returns out [T, H, D] (allocated when None).
    """
    out = torch.empty_like(q) if out is None else out
    _ext_or_raise().attention(out, q, k_cache, v_cache, slots, context_lens, cu_query_lens, 0, float(scale),
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
    _ext_or_raise().attention(out, q, k_pool, v_pool, block_tables, context_lens, cu_query_lens, k_pool.shape[1],
                              float(scale), k_new, v_new)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vattn.attention.cpu_kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--build", action="store_true", help="compile the kernel now (make install runs this)")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = ap.parse_args(argv)
    if not args.build:
        ap.print_help()
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = load(verbose=args.verbose) is not None
    if ok:
        print(f"vattn CPU attention kernel ready in {build_directory()}")
        return 0
    print(f"vattn CPU attention kernel could not be built (the per-sequence torch paths will be used): {_error}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
