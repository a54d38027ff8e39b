"""PNG plots (matplotlib, Agg backend, imported on use): throughput by engine, latency against request rate, KV
memory over a run. Each function writes one file and returns its path."""

from __future__ import annotations

import textwrap
from pathlib import Path


def _plt():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        import sys

        print("vattn bench: matplotlib is not installed (pip install 'vattn[bench]'): no PNG plot", file=sys.stderr)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(ax, title: str) -> None:
    ax.set_title("\n".join(textwrap.fill(line, 90) for line in title.splitlines()), fontsize=8)


def throughput_plot(path: Path, rows: list[dict], title: str) -> Path | None:
    """Output tokens/s per engine (engines without numbers are listed with their reason)."""
    plt = _plt()
    if plt is None:
        return None
    ok = [r for r in rows if r.get("output_tokens_per_s")]
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(3, len(ok)) + 1.5))
    names = [r["engine"] for r in ok]
    vals = [r["output_tokens_per_s"] for r in ok]
    bars = ax.barh(names[::-1], vals[::-1], color="tab:blue")
    for b, r in zip(bars, ok[::-1]):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {b.get_width():,.0f} ({r['output_ratio']:.2f}x)",
                va="center", fontsize=8)
    ax.set_xlabel("output tokens / s")
    ax.set_xlim(0, max(vals) * 1.35)
    missing = [f"{r['engine']}: {r.get('note', '')}"[:100] for r in rows if not r.get("output_tokens_per_s")]
    _title(ax, title + ("\nnot run: " + "; ".join(missing) if missing else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def serve_plot(path: Path, rows: list[dict], title: str) -> Path | None:
    """Mean TPOT, mean TTFT and output throughput against request rate (or concurrency), one line per server."""
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    servers = sorted({r["server"] for r in rows if r.get("completed")})
    for name in servers:
        rs = [r for r in rows if r["server"] == name and r.get("completed")]
        xs = [r["load_x"] if r.get("load_x") is not None else i for i, r in enumerate(rs)]
        axes[0].plot(xs, [r["output_tokens_per_s"] for r in rs], "o-", label=name)
        for ax in axes:
            ax.set_xticks(xs, [r["load"] for r in rs], fontsize=7)
        axes[1].plot(xs, [1e3 * r["mean_tpot_s"] for r in rs], "o-", label=name)
        axes[2].plot(xs, [1e3 * r["mean_ttft_s"] for r in rs], "o-", label=name)
    xlabel = rows[0].get("load_label", "request rate (req/s)") if rows else ""
    for ax, yl in zip(axes, ("output tokens / s", "mean TPOT (ms)", "mean TTFT (ms)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.fill(line, 150) for line in title.splitlines()), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_plot(path: Path, traces: dict[str, list[dict]], title: str) -> Path | None:
    """Mapped and used KV MiB against step, one pair of lines per path."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, samples) in enumerate(traces.items()):
        color = f"C{i}"
        ax.plot([s["mapped_bytes"] / 2**20 for s in samples], color=color, label=f"{name} mapped")
        ax.plot([s["used_bytes"] / 2**20 for s in samples], color=color, linestyle=":", label=f"{name} live tokens")
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV MiB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _title(ax, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bars_plot(path: Path, labels: list[str], values: list[float], xlabel: str, title: str) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(4, len(labels)) + 1.5))
    ax.barh(labels[::-1], values[::-1], color="tab:green")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, axis="x")
    _title(ax, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
