"""Dispatch `vattn bench <mode> [flags]` to the mode's module; `--setup-peers` builds the peer environment."""

from __future__ import annotations

import importlib
import signal
import sys

MODES = {
    "throughput": "vattn.bench.throughput",
    "serve": "vattn.bench.serve",
    "memory": "vattn.bench.memory",
    "kernels": "vattn.bench.kernels",
    "roofline": "vattn.bench.roofline",
    "allocator": "vattn.bench.allocator",
}
USAGE = ("usage: vattn bench {" + ",".join(MODES) + "} [flags]   (vattn bench <mode> --help)\n"
         "       vattn bench --setup-peers [--venv DIR] [--gpu|--no-gpu]")


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        import vattn.bench

        print(vattn.bench.__doc__.strip() + "\n\n" + USAGE)
        return 0 if argv else 2
    if argv[0] == "--setup-peers":
        from vattn.bench.setup_peers import main as setup

        return setup(argv[1:])
    mode, rest = argv[0], argv[1:]
    if mode not in MODES:
        print(f"vattn bench: error: unknown mode {mode!r}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(MODES[mode])
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated run cleans up like an interrupted one (peer processes)
    try:
        module.main(rest)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vattn bench {mode}: error: {exc}", file=sys.stderr)
        return 2
    except AssertionError as exc:  # a failed check (token mismatch): the results were written first
        print(f"vattn bench {mode}: check failed: {exc}", file=sys.stderr)
        return 1
    return 0
