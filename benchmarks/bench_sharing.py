"""Shim: `python -m benchmarks.bench_sharing [old flags]` runs `vattn bench memory` (its sharing table is what this
script measured); --num-requests is the number of sharing requests, --preset the model."""

from __future__ import annotations

import sys

from vattn.bench import memory


def translate(argv: list[str]) -> list[str]:
    out, it = [], iter(argv)
    for a in it:
        if a == "--num-requests":
            out += ["--sharing-requests", next(it)]
        elif a == "--preset":
            out += ["--model", next(it)]
        elif a == "--modes":
            next(it)  # both modes always run
        else:
            out.append(a)
    return ["--model", "small", "--workload", "alpaca", "--num-requests", "8", "--kv-memory", "64M",
            "--kv-layouts", "per_layer,interleaved", "--page-sizes", "4K,64K", "--widths", "2,4,6",
            "--engines", "paged,vattention", "--name", "sharing"] + out


def main(argv: list[str] | None = None) -> dict:
    return memory.main(translate(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
