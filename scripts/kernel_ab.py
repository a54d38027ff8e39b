"""Old vs new CPU attention kernel, interleaved in one process: the kernel at a git revision against the working tree's.

    python scripts/kernel_ab.py --rev 898953a            # decode and prefill shapes of the bench presets
    python scripts/kernel_ab.py --rev HEAD~1 --threads 2

Each shape runs on cold caches (eight layers' caches cycled, as in a model's step), alternating the two builds for
--rounds rounds; it prints the best time of each and new/old. On this shared machine only the ratio means anything.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from vattn.attention import cpu_kernels
from vattn.cpp_extension import COMMON_HEADERS, CppExtension

REPO = Path(__file__).resolve().parents[1]
SOURCE = "vattn/attention/csrc/cpu_attention.cpp"
# (sequences, context, query heads, kv heads, head_dim, query tokens per sequence)
SHAPES = [(128, 192, 4, 2, 32, 1), (128, 192, 8, 4, 64, 1), (16, 128, 8, 4, 64, 128), (16, 128, 4, 2, 32, 128)]


def build_at(rev: str, folder: Path):
    """The kernel as it was at `rev` (with the shared headers of that revision, where it had them)."""
    (folder / "cpu_attention.cpp").write_bytes(subprocess.check_output(["git", "show", f"{rev}:{SOURCE}"], cwd=REPO))
    for header in COMMON_HEADERS.glob("*.h"):
        rel = header.relative_to(REPO).as_posix()
        found = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=REPO, capture_output=True)
        if found.returncode == 0:
            (folder / header.name).write_bytes(found.stdout)  # found before vattn/csrc: same folder as the source
    return CppExtension("vattn_cpu_attention_ab", folder / "cpu_attention.cpp", f"CPU attention kernel at {rev}",
                        "nothing", extra_flags=tuple(cpu_kernels.EXTENSION.extra_flags)).require()


def compare(old, new, shape, rounds: int, layers: int = 8) -> tuple[float, float]:
    B, ctx, H, Hk, D, qlen = shape
    caches = [(torch.randn(B, 256, Hk, D), torch.randn(B, 256, Hk, D)) for _ in range(layers)]
    slots = torch.arange(B, dtype=torch.int32)
    ctxs = torch.full((B,), ctx, dtype=torch.int32)
    cu = torch.arange(0, B + 1, dtype=torch.int32) * qlen
    q = torch.randn(B * qlen, H, D)
    out = torch.empty_like(q)
    best = {"old": float("inf"), "new": float("inf")}
    for _ in range(rounds):
        for name, ext in (("old", old), ("new", new)):
            t = time.perf_counter()
            for kc, vc in caches:
                ext.attention(out, q, kc, vc, slots, ctxs, cu, 0, D ** -0.5, None, None)
            best[name] = min(best[name], (time.perf_counter() - t) / layers)
    return best["old"], best["new"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", required=True, help="git revision of the old kernel")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        old = build_at(args.rev, Path(tmp))
        new = cpu_kernels.EXTENSION.require()
        print(f"kernel at {args.rev} (old) vs the working tree (new), {args.threads} thread(s), cold caches")
        for shape in SHAPES:
            o, n = compare(old, new, shape, args.rounds)
            B, ctx, H, Hk, D, qlen = shape
            kind = "decode" if qlen == 1 else f"prefill {qlen}"
            print(f"{kind:12s} {B:4d} seqs x {ctx} ctx, {H}/{Hk} heads, d {D}: old {o * 1e3:6.2f} ms  "
                  f"new {n * 1e3:6.2f} ms  new/old {n / o:.2f}", flush=True)


if __name__ == "__main__":
    main()
