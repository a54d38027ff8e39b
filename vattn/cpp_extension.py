"""Our C++ CPU kernels, each one source file compiled with torch.utils.cpp_extension the first time it is needed.
Headers they share live in vattn/csrc/ (on every extension's include path).

Needs a C++ compiler and ninja (a dependency). The build lands in a cache directory keyed by the source, the shared
headers, the flags, Python, torch and the CPU's vector capability: $VATTN_KERNEL_CACHE, else ~/.cache/vattn/kernels.
When a build fails, `load()` returns None after one warning that says why, and the caller falls back to plain torch.
"""

from __future__ import annotations

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

COMMON_HEADERS = Path(__file__).parent / "csrc"  # headers shared by the extensions (vec_exp.h)

_ARCH_FLAGS = {  # by torch's own view of the CPU, so the build runs wherever torch's vector kernels run
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def _is_x86() -> bool:
    return sysconfig.get_platform().endswith(("x86_64", "amd64"))


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the ninja wheel (a dependency) puts it next to this interpreter's scripts, which
    are not on PATH when the venv's python is run without activating the venv."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and scripts and os.path.exists(os.path.join(scripts, "ninja")):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


class CppExtension:
    """One C++ source built into one Python module on first use (thread-safe, at most one attempt per process)."""

    def __init__(self, name: str, source: Path, what: str, fallback: str, extra_flags: tuple[str, ...] = ()):
        self.name, self.source, self.what, self.fallback = name, Path(source), what, fallback
        self.extra_flags = list(extra_flags)
        self._lock = threading.Lock()
        self._ext = None
        self.error: str | None = None

    def flags(self) -> list[str]:
        arch = _ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), []) if _is_x86() else []
        # -fopenmp makes at::parallel_for (inline, OpenMP in torch's CPU builds) run on torch's threads; the OpenMP
        # symbols resolve against the runtime torch already loaded, so torch.set_num_threads governs the kernel too.
        return ["-O3", "-fopenmp", *self.extra_flags, *arch]

    def module_name(self) -> str:
        # the source's path too: the build files name it, so two checkouts must not share (and rebuild) one folder
        headers = b"".join(h.read_bytes() for h in sorted(COMMON_HEADERS.glob("*.h")))
        key = hashlib.sha1(self.source.read_bytes() + headers +
                           " ".join([str(self.source.resolve()), *self.flags()]).encode())
        key = key.hexdigest()[:12]
        cap = torch.backends.cpu.get_cpu_capability()
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}_{cap}"
        return re.sub(r"\W", "_", f"{self.name}_{tag}_{key}").lower()

    def build_directory(self) -> Path:
        root = Path(os.environ.get("VATTN_KERNEL_CACHE") or Path.home() / ".cache" / "vattn" / "kernels")
        return root / self.module_name()

    def load(self, verbose: bool = False):
        """The compiled module (built on first use), or None after one warning when it cannot be built here."""
        with self._lock:
            if self._ext is not None or self.error is not None:
                return self._ext
            try:
                from torch.utils.cpp_extension import load as cpp_load

                _put_ninja_on_path()
                build_dir = self.build_directory()
                build_dir.mkdir(parents=True, exist_ok=True)
                self._ext = cpp_load(name=self.module_name(), sources=[str(self.source)], extra_cflags=self.flags(),
                                     extra_include_paths=[str(COMMON_HEADERS)], build_directory=str(build_dir), verbose=verbose)
            except Exception as e:  # no compiler, no ninja, a compile error: fall back, loudly, once
                self.error = f"{type(e).__name__}: {str(e).strip()[-2000:]}"
                warnings.warn(f"vattn: the {self.what} could not be built, falling back to {self.fallback} (slower). "
                              f"Reason: {self.error}", RuntimeWarning, stacklevel=3)
            return self._ext

    def available(self) -> bool:
        return self.load() is not None

    def require(self):
        ext = self.load()
        if ext is None:
            raise RuntimeError(f"the {self.what} is not available: {self.error}")
        return ext
