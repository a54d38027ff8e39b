"""Shim: `python -m benchmarks.bench_kernels [flags]` is `vattn bench kernels [flags]`."""

import sys

from vattn.bench.kernels import main

if __name__ == "__main__":
    main(sys.argv[1:])
