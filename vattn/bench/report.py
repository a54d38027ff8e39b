"""What every result carries and how it is written: the label (machine, versions, model, command, load average),
the table on stdout, JSON, a Markdown summary and the table as text, all under benchmarks/results/<machine>/.

Contract: `Report.finish(rows)` stamps the end-of-run load average and writes `<out>.json`, `<out>.md` and
`<out>.txt`; every number in `rows` that is not None must be finite (a NaN or inf raises, rather than landing in a
committed result).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vattn

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA_VERSION = 1


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_label(device: str) -> str:
    """The GPU's name on cuda, else the CPU model, core count and vector capability (a VM's model name can be as
    bare as 'AMD EPYC' on CPUs generations apart, and our kernels differ by capability: AVX512 or AVX2)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} cpus, {torch.backends.cpu.get_cpu_capability()})"


def results_dir(device: str) -> Path:
    """benchmarks/results/cpu, or benchmarks/results/<gpu name as a slug> (e.g. nvidia-h100-80gb-hbm3)."""
    if device != "cuda":
        return RESULTS / "cpu"
    return RESULTS / re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def command_line(argv: list[str] | None) -> str:
    """The exact command, as a person would type it again."""
    return "vattn bench " + shlex.join(sys.argv[1:] if argv is None else argv)


def versions(peers: dict[str, str] | None = None) -> dict[str, str]:
    import transformers

    v = {"vattn": vattn.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "python": platform.python_version()}
    v.update(peers or {})
    return v


def size_label(n: int) -> str:
    """65536 -> '64K', 2097152 -> '2M', 5000 -> '5000'."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def format_table(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    """Columns are (key, format spec); a missing or None value prints as '-', a string as itself."""
    cells = [[k for k, _ in columns]]
    for r in rows:
        line = []
        for k, spec in columns:
            v = r.get(k)
            line.append("-" if v is None else _clip(v) if isinstance(v, str) else format(v, spec))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = [" ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def markdown_table(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    head = "| " + " | ".join(k for k, _ in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = []
    for r in rows:
        cells = []
        for k, spec in columns:
            v = r.get(k)
            cells.append("-" if v is None else v if isinstance(v, str) else format(v, spec))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def check_finite(obj, where: str = "result") -> None:
    """Raise ValueError naming the first NaN / inf found anywhere in `obj`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}: a benchmark result must be finite")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_finite(v, f"{where}[{i}]")


@dataclass
class Report:
    """One benchmark run's label and output files. `header` is filled at creation (load average at start)."""

    mode: str
    device: str
    command: str
    out: Path  # the JSON path; .md, .txt and .png files go beside it
    header: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.started = time.perf_counter()
        self.header = {"schema": SCHEMA_VERSION, "mode": self.mode, "machine": machine_label(self.device),
                       "cpu": cpu_model(), "device": self.device, "cpus": os.cpu_count(),
                       "command": self.command, "versions": versions(), "torch_threads": torch.get_num_threads(),
                       "load_avg_start": load_average(),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **self.header}

    def header_text(self) -> str:
        h, v = self.header, self.header["versions"]
        peers = "".join(f", {k} {val}" for k, val in v.items() if k not in ("vattn", "torch", "transformers",
                                                                            "python"))
        return "\n".join([
            f"machine: {h['machine']}  (vattn {v['vattn']}, torch {v['torch']}, transformers {v['transformers']}"
            f"{peers}, python {v['python']}, {h['torch_threads']} torch threads, {h['date']})",
            f"command: {h['command']}",
            f"model: {h.get('model', '-')}",
            f"load average (1/5/15 min) at start {h.get('load_avg_start')} and end {h.get('load_avg_end')}"
            " -- other processes share this machine"])

    def finish(self, rows: list[dict], columns: list[tuple[str, str]], notes: list[str],
               extra: dict | None = None, tables: list[tuple[str, str, list[tuple[str, str]], list[dict]]] = ()
               ) -> dict:
        """Write JSON, Markdown and text; print the tables; return the JSON payload. `tables` adds
        (key, title, columns, rows) tables, stored under payload[key]."""
        self.header["load_avg_end"] = load_average()
        self.header["elapsed_s"] = time.perf_counter() - self.started
        payload = {**self.header, **(extra or {}), "results": rows, **{k: r for k, _, _, r in tables}}
        check_finite(payload)
        text = "\n".join([self.header_text(), format_table(columns, rows),
                          *[f"\n{title}\n{format_table(c, r)}" for _, title, c, r in tables], *notes])
        md = "\n".join([f"# vattn bench {self.mode}", "", "```", self.header_text(), "```", "",
                        markdown_table(columns, rows), "",
                        *[f"### {title}\n\n{markdown_table(c, r)}\n" for _, title, c, r in tables],
                        *[f"- {n}" for n in notes]])
        print(text, flush=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(payload, indent=2) + "\n")
        self.out.with_suffix(".txt").write_text(text + "\n")
        self.out.with_suffix(".md").write_text(md + "\n")
        return payload

    def plot_path(self, suffix: str = "") -> Path:
        return self.out.with_name(self.out.stem + suffix + ".png")
