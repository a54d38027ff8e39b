"""Shim: `python -m benchmarks.bench_allocator [flags]` is `vattn bench allocator [flags]`."""

import sys

from vattn.bench.allocator import main

if __name__ == "__main__":
    main(sys.argv[1:])
