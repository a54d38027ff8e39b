"""Shim: `python -m benchmarks.compare [old flags]` runs `vattn bench throughput` on vattn's two paths (paged first,
as before) with the old defaults (ShareGPT-like x0.25, 48 requests, preset `small`, 32 MiB pool, 16 sequences)."""

from __future__ import annotations

import sys

from vattn.bench import throughput

DEFAULTS = ["--engines", "paged,vattention", "--workload", "sharegpt", "--num-requests", "48", "--scale", "0.25",
            "--model", "small", "--kv-memory", "32M", "--max-num-seqs", "16", "--max-num-batched-tokens", "2048",
            "--threads", "1"]


def translate(argv: list[str]) -> list[str]:
    """Old flags -> new: --preset NAME is --model NAME; the result is named compare_<dist>[_poisson]."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--preset":
            out[i] = "--model"
        elif a.startswith("--preset="):
            out[i] = "--model=" + a.split("=", 1)[1]
    dist = next((out[i + 1] for i, a in enumerate(out[:-1]) if a == "--dist"), "sharegpt")
    name = f"compare_{dist}" + ("_poisson" if "--rate" in out else "")
    return DEFAULTS + ["--name", name] + out


def main(argv: list[str] | None = None) -> dict:
    return throughput.main(translate(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
