"""What every benchmark shares: the machine label, the load on it, model presets, and table + JSON output."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vattn.cli import parse_size  # noqa: F401  (one size parser for the CLI and the benchmarks)

RESULTS = Path(__file__).parent / "results"

# Random-weight Llama-like models, built once per preset with tests.tiny_models (no downloads).
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=4096),
    # Llama-3-8B shapes (hidden 4096, 32 heads, 8 KV heads, head_dim 128, MLP 14336) with 4 layers: GPU runs
    "llama3-8b-4l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=8192, initializer_range=0.02),
}


def model_dir(preset: str, dtype: torch.dtype = torch.float32) -> Path:
    """Directory of the random-weight `preset` model (built on first use under $VATTN_BENCH_MODELS or /tmp)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    from tests.tiny_models import get_tiny_model

    root = Path(os.environ.get("VATTN_BENCH_MODELS", Path(tempfile.gettempdir()) / "vattn-bench-models"))
    root.mkdir(parents=True, exist_ok=True)
    return get_tiny_model("llama", root, dtype=dtype, **PRESETS[preset])


def resolve_model(model: str | None, preset: str, device: str) -> tuple[str, str]:
    """(model directory, label): an explicit --model wins; else the preset (bf16 weights on cuda)."""
    if model:
        if not os.path.isdir(model):
            raise ValueError(f"--model: directory not found: {model}")
        return model, os.path.basename(os.path.normpath(model))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return str(model_dir(preset, dtype)), f"random llama preset {preset!r}"


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    return name


def machine_label(device: str) -> str:
    """The GPU's name on cuda, else the CPU model and core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


def results_dir(device: str) -> Path:
    """benchmarks/results/cpu, or benchmarks/results/<gpu name as a slug> (e.g. nvidia-h100-80gb-hbm3)."""
    if device != "cuda":
        return RESULTS / "cpu"
    return RESULTS / re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def command_line(module: str, argv: list[str] | None) -> str:
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def header(device: str, command: str, extra: dict | None = None) -> dict:
    """The label every result carries: machine, command, versions, load average at the start."""
    h = {"machine": machine_label(device), "device": device, "command": command, "torch": torch.__version__,
         "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "load_avg_start": load_average(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    h.update(extra or {})
    return h


def header_text(h: dict) -> str:
    lines = [f"machine: {h['machine']}  (torch {h['torch']}, python {h['python']}, "
             f"{h['torch_threads']} torch threads, {h['date']})",
             f"command: {h['command']}",
             f"load average (1/5/15 min) at start {h.get('load_avg_start')} and end {h.get('load_avg_end')}"
             " -- other processes share this machine"]
    return "\n".join(lines)


def write_results(out: str | Path, payload: dict, text: str) -> None:
    """JSON at `out` and the printed table beside it (.txt)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".txt").write_text(text + "\n")


def format_table(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    """Columns are (key, format spec); a missing or None value prints as '-'."""
    cells = [[k for k, _ in columns]]
    for r in rows:
        line = []
        for k, spec in columns:
            v = r.get(k)
            line.append("-" if v is None else format(v, spec))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = [" ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def median_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds of `repeats` calls of fn (sync() before reading the clock)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def size_label(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
