#!/usr/bin/env python
"""Regenerate the committed CPU benchmark results and the README's benchmark section from them.

    python scripts/bench_results.py                 # every run below, then the README section (make bench-results)
    python scripts/bench_results.py --only memory,kernels
    python scripts/bench_results.py --readme-only   # rebuild the README section from the JSON already there
    python scripts/bench_results.py --list

Each run is one `vattn bench` command writing JSON / Markdown / text / PNG under benchmarks/results/cpu/. The README
section between the markers `<!-- bench:begin -->` and `<!-- bench:end -->` is generated from those JSON files
(never hand-copied): the engines table, the online table, memory, kernels and the roofline, each with the machine,
the date and the load average it was measured under. Run it on an idle machine: every figure is labelled with the
load it saw, and a busy machine is called out in the README. Needs the peer environment for the vLLM rows
(`make peers`); without it those rows say "not installed".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "cpu"
README = REPO / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# 1 GiB of KV per engine: vLLM's CPU KV space comes in whole GiB, so this is the one budget all engines can share
# (and 128 sequences of 256 tokens of the 8-layer model need 512 MiB: no preemption on any engine)
KV = ["--kv-memory", "1G"]
FIXED = ["--workload", "fixed", "--input-len", "128", "--output-len", "128", "--num-requests", "128",
         "--max-num-seqs", "128", *KV]
# name -> the `vattn bench` arguments (its JSON lands at benchmarks/results/cpu/<name>.json)
RUNS: dict[str, list[str]] = {
    # the harness issue's table: 128 requests of 128 + 128 tokens, greedy, ignore_eos, every engine
    # (the median of round-robin repeats: this shared machine's speed drifts by 10-20% within minutes)
    "throughput_fixed_llama-4l-h128": ["throughput", "--model", "llama-4l-h128", *FIXED, "--repeats", "3"],
    "throughput_fixed_llama-8l-h512": ["throughput", "--model", "llama-8l-h512", *FIXED, "--repeats", "2"],
    # variable lengths: where continuous batching should beat static batches
    "throughput_sharegpt_llama-4l-h128": ["throughput", "--model", "llama-4l-h128", "--workload", "sharegpt",
                                          "--scale", "0.5", "--num-requests", "128", "--max-num-seqs", "128", *KV,
                                          "--repeats", "3"],
    # online: 64 streams at once against each server, and vLLM's own client on the same servers
    "serve_fixed_llama-8l-h512": ["serve", "--launch", "vattn,vllm", "--model", "llama-8l-h512", "--workload",
                                  "fixed", "--input-len", "128", "--output-len", "128", "--num-requests", "64",
                                  "--max-concurrency", "64", "--max-num-seqs", "64", *KV, "--compare-vllm-client"],
    # latency against request rate
    "serve_rates_llama-4l-h128": ["serve", "--launch", "vattn,vllm", "--model", "llama-4l-h128", "--workload",
                                  "sharegpt", "--scale", "0.25", "--num-requests", "64", "--request-rate",
                                  "2,4,8,inf", "--max-num-seqs", "64", *KV],
    "memory_sharegpt": ["memory", "--model", "llama-4l-h128", "--workload", "sharegpt", "--scale", "0.25",
                        "--num-requests", "48", "--page-sizes", "4K,64K", "--kv-layouts", "per_layer,interleaved",
                        "--kv-memory", "2M", "--max-num-seqs", "32", "--widths", "2,4,6"],
    # tensor parallelism on this machine: what splitting a small model over 2 processes (gloo) costs
    "throughput_tp_llama-8l-h512": ["throughput", "--model", "llama-8l-h512", "--engines", "vattention,paged",
                                    "--tensor-parallel-size", "1,2", "--workload", "fixed", "--input-len", "128",
                                    "--output-len", "64", "--num-requests", "64", "--max-num-seqs", "64", *KV],
    # the whole machine: every engine computing on both cores (vattn 2 torch threads; vLLM's compute threads
    # bound to cores 0-1, its scheduler process beside them), where the runs above give each one core
    "throughput_fixed_llama-4l-h128_2cores": ["throughput", "--model", "llama-4l-h128", *FIXED, "--engines",
                                              "vattention,vllm", "--threads", "2", "--repeats", "3"],
    "throughput_fixed_llama-8l-h512_2cores": ["throughput", "--model", "llama-8l-h512", *FIXED, "--engines",
                                              "vattention,vllm", "--threads", "2", "--repeats", "2"],
    "kernels": ["kernels"],
    "roofline": ["roofline", "--model", "llama-8l-h512", "--batch", "1,16,64", "--context", "256"],
    "allocator": ["allocator", "--backend", "host", "--sizes", "4K,64K,2M"],
}


THREADED = ("throughput", "serve", "memory", "roofline", "kernels")  # modes with a --threads flag


def run(name: str, python: str, threads: int | None = None) -> tuple[int, float]:
    cmd = [python, "-m", "vattn.bench", *RUNS[name], "--json", str(OUT / f"{name}.json"), "--no-progress"]
    if threads and RUNS[name][0] in THREADED and "--threads" not in RUNS[name]:  # a run's own count stays
        cmd += ["--threads", str(threads)]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    dt = time.perf_counter() - t0
    print(f"== {name}: exit {rc} after {dt:.0f} s", flush=True)
    return rc, dt


# -- the README section --------------------------------------------------------------------------------------

def load(name: str) -> dict | None:
    """The result JSON written by `vattn bench` (files of the pre-harness scripts, without a schema, are skipped)."""
    p = OUT / f"{name}.json"
    d = json.loads(p.read_text()) if p.exists() else None
    return d if d and "schema" in d else None


def label(d: dict) -> str:
    """Where and when a result was measured, with the load it saw."""
    busy = max((d.get("load_avg_start") or [0])[0], (d.get("load_avg_end") or [0])[0])
    cpus = d.get("cpus") or 1
    flag = f" **measured under load (1-min load average up to {busy:.1f} on {cpus} cpus): preliminary**" \
        if busy > 0.5 * cpus else ""
    v = d["versions"]
    peers = f", vLLM {v['vllm']}" if "vllm" in v else ""
    return (f"{d['machine']}, {d['date']}; vattn {v['vattn']}, torch {v['torch']}, transformers "
            f"{v['transformers']}{peers}; load average {d.get('load_avg_start')} -> {d.get('load_avg_end')}.{flag}")


def link(name: str, ext: str = "png") -> str:
    return f"benchmarks/results/cpu/{name}.{ext}"


def fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def throughput_section() -> list[str]:
    models = [("throughput_fixed_llama-4l-h128", "4 layers / hidden 128"),
              ("throughput_fixed_llama-8l-h512", "8 layers / hidden 512")]
    found = [(load(n), n, title) for n, title in models]
    found = [f for f in found if f[0]]
    if not found:
        return []
    engines: list[str] = []
    for d, _, _ in found:
        engines += [r["engine"] for r in d["results"] if r["engine"] not in engines]
    lines = ["**Offline throughput** (`vattn bench throughput`): 128 requests of 128 prompt + 128 output tokens, greedy, "
             "`ignore_eos`, the same random-weight Llama, one engine after the other in one run. Output tokens/s "
             "(ratio to the first row):", "",
             "| engine | " + " | ".join(title for _, _, title in found) + " |",
             "| --- |" + " --- |" * len(found)]
    for e in engines:
        cells = []
        for d, _, _ in found:
            r = next((x for x in d["results"] if x["engine"] == e), None)
            if r is None:
                cells.append("-")
            elif r.get("output_tokens_per_s") is None:
                cells.append("not run: " + r.get("note", "")[:80])
            else:
                cells.append(f"{r['output_tokens_per_s']:,.0f} ({r['output_ratio']:.2f}x)")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines.append("")
    for d, n, title in found:
        lines.append(f"- {title}: {label(d)} [table]({link(n, 'md')}), [plot]({link(n)}); "
                     f"{token_sentence(d)}")
    lines.append("")
    lines += same_config(found)
    lines += losses(found)
    tp = load("throughput_tp_llama-8l-h512")
    if tp:
        lines += ["", "Tensor parallelism (`--tensor-parallel-size 1,2`, 64 requests of 128 + 64 tokens, 8-layer model, "
                  "gloo on this machine's 2 cores; one torch thread per rank, so TP=2 computes on both cores where TP=1 uses "
                  "one), output tokens/s: " + ", ".join(
                      f"{r['engine']} {fmt(r.get('output_tokens_per_s'))} ({r['output_ratio']:.2f}x)"
                      for r in tp["results"] if r.get("output_ratio")) +
                  f". {label(tp)} [table]({link('throughput_tp_llama-8l-h512', 'md')}); {token_sentence(tp)}"]
    whole = [(load(f"{n}_2cores"), n, title) for n, title in models]
    whole = [w for w in whole if w[0]]
    if whole:
        lines += ["", "The whole machine (`--threads 2`: vattn with 2 torch threads, vLLM's compute threads bound to both "
                  "cores with its scheduler process beside them; by default vLLM keeps one of the 2 cores for that "
                  "process and computes on the other), same workload, output tokens/s: " + "; ".join(
                      f"{title}: " + ", ".join(f"{r['engine']} {fmt(r.get('output_tokens_per_s'))}"
                                               + (f" ({r['output_ratio']:.2f}x)" if r.get("output_ratio") else " (not run)")
                                               for r in d["results"])
                      + f" ({label(d)} [table]({link(n + '_2cores', 'md')}))" for d, n, title in whole)]
    sg = load("throughput_sharegpt_llama-4l-h128")
    if sg:
        lines += ["", "ShareGPT-like variable lengths (x0.5, 128 requests, 4-layer model), output tokens/s: " + ", ".join(
            f"{r['engine']} {fmt(r.get('output_tokens_per_s'))}" + (f" ({r['output_ratio']:.2f}x)"
                                                                  if r.get("output_ratio") else " (not run)")
            for r in sg["results"]) + f". {label(sg)} [table]({link('throughput_sharegpt_llama-4l-h128', 'md')})"]
    return lines


def token_sentence(d: dict) -> str:
    t = d.get("token_check") or {}
    if not t.get("compared"):
        return "greedy tokens not compared."
    if t["mismatches"]:
        return f"**{t['mismatches']} greedy-token mismatch(es) between vattn's paths**."
    extra = f" ({t['near_tie_divergences']} near-tie divergences)" if t["near_tie_divergences"] else ""
    return f"greedy tokens identical across vattn's paths{extra}."


def same_config(found) -> list[str]:
    """Where static's reservation equals the vAttention page (a page already holds a whole row), the two rows are
    the same configuration: say so, so their difference reads as noise, not as a finding."""
    out = []
    for d, _, title in found:
        rows = {r["engine"]: r for r in d["results"] if r.get("tokens_per_unit")}
        static = rows.get("static")
        twins = [e for e, r in rows.items() if e.startswith("vattention") and static
                 and r["tokens_per_unit"] >= static["tokens_per_unit"]]
        if twins:
            out.append(f"- {title}: static and {twins[0]} run the same configuration here (one "
                       f"{static['tokens_per_unit']}-token page holds a whole row): the gap between them is "
                       "run-to-run noise.")
    return out


def losses(found) -> list[str]:
    """Say plainly where the vAttention path loses."""
    out = []
    for d, _, title in found:
        rows = {r["engine"]: r for r in d["results"] if r.get("output_tokens_per_s")}
        ours = next((r for e, r in rows.items() if e.startswith("vattention")), None)
        if ours is None:
            continue
        beaten = [(e, r["output_tokens_per_s"] / ours["output_tokens_per_s"]) for e, r in rows.items()
                  if r["output_tokens_per_s"] > ours["output_tokens_per_s"]]
        if beaten:
            out.append(f"- Where vattn loses ({title}): " + "; ".join(
                f"{e} is {x:.2f}x the vAttention path's output throughput" for e, x in beaten) + ".")
        else:
            out.append(f"- {title}: the vAttention path has the highest output throughput of the engines run.")
    return out


def serve_section() -> list[str]:
    d = load("serve_fixed_llama-8l-h512")
    lines = []
    if d:
        lines += ["**Online** (`vattn bench serve --launch vattn,vllm`): 64 streaming requests of 128 + 128 tokens, "
                  "64 at once, 8-layer model, each server launched with the same model and sizes:", "",
                  "| server | output tok/s | mean TTFT ms | p99 TTFT ms | mean TPOT ms | p99 TPOT ms | mean ITL ms "
                  "| failed |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in d["results"]:
            if r.get("completed"):
                lines.append(f"| {r['server']} | {r['output_tokens_per_s']:,.0f} | {r['mean_ttft_ms']:,.0f} | "
                             f"{r['p99_ttft_ms']:,.0f} | {r['mean_tpot_ms']:,.1f} | {r['p99_tpot_ms']:,.1f} | "
                             f"{r['mean_itl_ms']:,.1f} | {r['failed']} |")
            else:
                lines.append(f"| {r['server']} | not run: {r.get('note', '')[:100]} | | | | | | |")
        lines += ["", f"- {label(d)} [table]({link('serve_fixed_llama-8l-h512', 'md')}), "
                  f"[plot]({link('serve_fixed_llama-8l-h512')})"]
        for a in d.get("client_agreement", []):
            if "error" in a:
                lines.append(f"- vLLM's own load generator on {a['server']}: {a['error'][:150]}")
                continue
            names = {"output_tokens_per_s": "output tok/s", "mean_ttft_s": "mean TTFT", "mean_tpot_s": "mean TPOT",
                     "mean_itl_s": "mean ITL", "mean_e2e_s": "mean E2E"}
            parts = [f"{names.get(k, k)} {v['ratio']:.2f}" for k, v in a.items() if isinstance(v, dict) and "ratio" in v]
            lines.append(f"- Our client / vLLM's own load generator (`vllm.benchmarks.serve`, then our client again, "
                         f"back to back on the same warm {a['server']} server and load): " + ", ".join(parts)
                         + " (1.00 = identical).")
    rates = load("serve_rates_llama-4l-h128")
    if rates:
        lines += ["", "Latency against Poisson request rate (ShareGPT-like x0.25, 64 requests, 4-layer model): "
                  f"[plot]({link('serve_rates_llama-4l-h128')}), [table]({link('serve_rates_llama-4l-h128', 'md')}). "
                  + label(rates)]
    return lines


def memory_section() -> list[str]:
    d = load("memory_sharegpt")
    if not d:
        return []
    lines = ["**KV memory** (`vattn bench memory`, ShareGPT-like x0.25, 48 requests, a 2 MiB pool per path): share of "
             "mapped bytes holding live tokens (mean over steps), peak concurrent sequences, preemptions:", "",
             "| path | tokens / unit | live share of mapped | of held | peak seqs | preemptions |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in d["results"]:
        lines.append(f"| {r['path']} | {r['tokens_per_unit']} | {r['used_of_mapped']:.2f} | {r['used_of_held']:.2f} | "
                     f"{r['peak_running']} | {r['preemptions']} |")
    sharing = d.get("sharing") or []
    if sharing:
        best = {}
        for r in sharing:
            best.setdefault((r["mode"], r["path"]), []).append(r["saved_mean_pct"])
        lines += ["", "Memory saved by sharing (mean units held, 1 - shared / unshared): " + "; ".join(
            f"{mode} on {path} {min(v):.0f}-{max(v):.0f}%" for (mode, path), v in best.items())
            + " (vLLM paper: 6.1-9.8% parallel, 37.6-55.2% beam)."]
    lines += ["", f"- {label(d)} [table]({link('memory_sharegpt', 'md')}), [plot]({link('memory_sharegpt')})"]
    return lines


def kernels_section() -> list[str]:
    lines = []
    k = load("kernels")
    if k:
        vp = [r["virtual_over_plain"] for r in k["results"] if r.get("virtual_over_plain")]
        pc = [r["paged_over_contiguous"] for r in k["results"] if r.get("paged_over_contiguous")]
        lines.append(f"**Kernels** (`vattn bench kernels`): the same SDPA kernel on an allocator virtual tensor over a "
                     f"plain torch tensor: {min(vp):.2f}-{max(vp):.2f}x (1.00 = virtual memory costs nothing); paged "
                     f"(gather + SDPA) over contiguous: {min(pc):.2f}-{max(pc):.2f}x. {label(k)} "
                     f"[table]({link('kernels', 'md')})")
    r = load("roofline")
    if r:
        lines += ["", "**Roofline** (`vattn bench roofline`, 8-layer model, context 256): decode step time as a "
                  "fraction of the memory-bandwidth bound: " + ", ".join(
                      f"{x['path']} b{x['batch']} {x['fraction_of_bound']:.3f}" for x in r["results"])
                  + f" (copy bandwidth {r['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s). {label(r)} "
                  f"[table]({link('roofline', 'md')})"]
    return lines


def readme_section() -> str:
    parts = ["_Generated by `scripts/bench_results.py` from `benchmarks/results/cpu/*.json`; do not edit by hand._", ""]
    for section in (throughput_section(), serve_section(), memory_section(), kernels_section()):
        if section:
            parts += section + [""]
    return "\n".join(parts).rstrip() + "\n"


def update_readme(path: Path = README) -> bool:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: the markers {BEGIN} / {END} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + "\n" + readme_section() + END + tail
    changed = new != text
    path.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(RUNS)}")
    ap.add_argument("--readme-only", action="store_true", help="only rebuild the README section")
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    ap.add_argument("--python", default=sys.executable, help="the project's python (default: this one)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every run (default: each mode's own: every CPU; kernels 1). On a busy "
                         "machine use 1: OpenMP threads that wait for a core make timings meaningless")
    args = ap.parse_args(argv)
    names = list(RUNS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in RUNS]
    if bad:
        raise SystemExit(f"--only: unknown run(s) {bad}; choose from {', '.join(RUNS)}")
    if args.list:
        for n in names:
            print(f"{n}: vattn bench {' '.join(RUNS[n])} --json benchmarks/results/cpu/{n}.json")
        return 0
    failed, t0 = [], time.perf_counter()
    if not args.readme_only:
        OUT.mkdir(parents=True, exist_ok=True)
        for n in names:
            rc, _ = run(n, args.python, args.threads)
            if rc != 0:
                failed.append(n)
    update_readme()
    print(f"README benchmark section regenerated; total {time.perf_counter() - t0:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
