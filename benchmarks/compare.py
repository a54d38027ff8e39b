"""The same workload through the vAttention and the PagedAttention KV paths, in one run, side by side.

    python -m benchmarks.compare [--dist sharegpt|alpaca] [--num-requests N] [--scale S] [--rate R]
                                 [--page-sizes 4K,64K] [--block-size 16] [--kv-memory 32M] [--device cpu|cuda]

Each path gets a fresh engine on the same model and the same requests (greedy, ignore_eos, so every request
produces exactly its sampled output length). One warm-up request runs first and is not counted. The step loop
keeps its own clock: the sum of `engine.step()` times, plus idle gaps until the next Poisson arrival (skipped,
not slept). KV statistics are sampled after every step, outside that clock. Per path we report output tokens/s,
total time, mean TTFT / TPOT, preemptions, peak and mean mapped KV bytes, the mean fraction of mapped KV bytes
that hold live tokens, and map_wait_seconds (vAttention: step time spent waiting on page mapping). Ratios are
vAttention / paged from this same run. The run fails if any two paths produce different tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import (
    command_line,
    format_table,
    header,
    header_text,
    load_average,
    parse_size,
    resolve_device,
    resolve_model,
    results_dir,
    size_label,
    write_results,
)
from benchmarks.workloads import DISTS, Workload, make_workload
from vattn.engine import LLMEngine
from vattn.sampling_params import SamplingParams


class TokenMismatchError(AssertionError):
    """Two KV paths produced different greedy tokens for the same request."""


def build_engine(model: str, kind: str, device: str, args, page_size: int | None,
                 layout: str = "per_layer") -> LLMEngine:
    from vattn.config import EngineConfig

    cfg = EngineConfig(model=model, kv_cache=kind, device=device, dtype=args.dtype, kv_cache_memory=args.kv_memory,
                       page_size=page_size, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_prefix_caching=False, preemption_mode=args.preemption_mode,
                       attention_kernel=args.contiguous_kernel if kind == "vattention" else "auto",
                       kv_layout=layout)
    return LLMEngine(cfg)


NEAR_TIE = 1e-3  # nats: two candidates this close may swap places when the batch (so the float order) differs


def greedy(max_tokens: int) -> SamplingParams:
    # top-2 logprobs prove, where two paths diverge, that the two tokens were tied within float noise
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)


def drive(engine: LLMEngine, wl: Workload, sync) -> dict:
    """Run the workload to completion; returns timings, per-step KV samples and each request's tokens."""
    pending = sorted(wl.requests, key=lambda r: r.arrival)
    arrival = {r.request_id: r.arrival for r in wl.requests}
    first, finish, tokens, logprobs = {}, {}, {}, {}
    samples = []  # (mapped_bytes, used_bytes, held_bytes): held = units owned by live sequences
    clock, steps, step_time = 0.0, 0, 0.0
    preempt0 = engine.scheduler.num_preemptions
    st0 = engine.kv_stats()
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].arrival <= clock:
            r = pending.pop(0)
            engine.add_request(r.request_id, None, greedy(r.max_tokens), prompt_token_ids=r.prompt_token_ids)
        if not engine.has_unfinished_requests():
            clock = pending[0].arrival  # idle until the next arrival: skip ahead instead of sleeping
            continue
        sync()
        t0 = time.perf_counter()
        outs = engine.step()
        sync()
        dt = time.perf_counter() - t0
        clock += dt
        step_time += dt
        steps += 1
        for out in outs:
            rid = out.request_id
            if rid not in first and out.outputs and out.outputs[0].token_ids:
                first[rid] = clock
            if out.finished:
                finish[rid] = clock
                tokens[rid] = list(out.outputs[0].token_ids)
                logprobs[rid] = out.outputs[0].logprobs
        st = engine.kv_stats()
        samples.append((st.mapped_bytes, st.used_bytes, (st.units_total - st.units_free) * st.page_bytes))
    st = engine.kv_stats()
    missing = [r.request_id for r in wl.requests if r.request_id not in tokens]
    if missing:
        raise RuntimeError(f"requests never finished: {missing[:5]}")
    short = [rid for rid, r in ((r.request_id, r) for r in wl.requests) if len(tokens[rid]) != r.max_tokens]
    if short:
        raise RuntimeError(f"requests ended early (aborted for lack of KV memory?): {short[:5]}")
    n_out = sum(len(t) for t in tokens.values())
    ttft = [first[rid] - arrival[rid] for rid in tokens]
    tpot = [(finish[rid] - first[rid]) / (len(t) - 1) for rid, t in tokens.items() if len(t) > 1]
    fractions = [u / m for m, u, _ in samples if m > 0]
    held = [u / h for _, u, h in samples if h > 0]
    return {
        "tokens": tokens,
        "logprobs": logprobs,
        "metrics": {
            "steps": steps, "output_tokens": n_out, "total_time_s": clock, "busy_time_s": step_time,
            "output_tokens_per_s": n_out / clock,
            "mean_ttft_s": statistics.mean(ttft), "p50_ttft_s": statistics.median(ttft),
            "mean_tpot_s": statistics.mean(tpot) if tpot else None,
            "preemptions": engine.scheduler.num_preemptions - preempt0,
            "peak_mapped_bytes": max(s[0] for s in samples), "mean_mapped_bytes": statistics.mean(s[0] for s in samples),
            "peak_used_bytes": max(s[1] for s in samples), "peak_held_bytes": max(s[2] for s in samples),
            "mean_used_fraction_of_mapped": statistics.mean(fractions) if fractions else None,
            "mean_used_fraction_of_held": statistics.mean(held) if held else None,
            "map_seconds": st.map_seconds - st0.map_seconds,
            "map_wait_seconds": st.map_wait_seconds - st0.map_wait_seconds,
        },
    }


def run_path(model: str, kind: str, page_size: int | None, device: str, wl: Workload, args,
             layout: str = "per_layer") -> dict:
    engine = build_engine(model, kind, device, args, page_size, layout)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        st = engine.kv_stats()
        engine.add_request("warmup", None, greedy(4), prompt_token_ids=wl.requests[0].prompt_token_ids[:16])
        while engine.has_unfinished_requests():
            engine.step()
        engine.kv.reclaim_all()  # start measuring from an empty cache
        res = drive(engine, wl, sync)
        st = engine.kv_stats()
        unit = {"page_size": page_size if kind == "vattention" else None,
                "block_size": args.block_size if kind == "paged" else None,
                "unit_bytes": st.page_bytes, "tokens_per_unit": st.tokens_per_unit,
                "pool_bytes": st.units_total * st.page_bytes,
                "attention_kernel": engine.kv.attention_backend.kernel}
        if kind == "paged":
            label = "paged"
        else:
            label = f"vattention@{size_label(engine.kv.page_size)}" + ("/interleaved" * (layout == "interleaved"))
        res["metrics"] = {"path": label, "kv_layout": layout if kind != "paged" else None,
                          "kv_cache": kind, **unit, **res["metrics"]}
        if kind == "vattention":
            res["metrics"]["page_size"] = engine.kv.page_size
        return res
    finally:
        engine.close()


def check_tokens(results: list[dict], wl: Workload) -> int:
    """Every path must produce the reference path's tokens. The one exception is a near-tie: where two paths first
    diverge, the reference's own top-2 logprobs show both tokens within NEAR_TIE (the continuations then differ,
    so the rest of that request is not compared). Returns how many requests diverged that way."""
    ref, near_ties = results[0], 0
    for other in results[1:]:
        for r in wl.requests:
            a, b = ref["tokens"][r.request_id], other["tokens"][r.request_id]
            if a == b:
                continue
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            lp = ref.get("logprobs", {}).get(r.request_id)
            if lp and at < min(len(a), len(b)) and b[at] in lp[at] and lp[at][a[at]] - lp[at][b[at]] < NEAR_TIE:
                near_ties += 1
                continue
            raise TokenMismatchError(
                f"{ref['metrics']['path']} and {other['metrics']['path']} differ on request {r.request_id} "
                f"at output token {at}: {a[at:at + 5]} vs {b[at:at + 5]}")
    return near_ties


COLUMNS = [("path", "s"), ("attention_kernel", "s"), ("tokens_per_unit", "d"), ("output_tokens_per_s", ".1f"),
           ("total_time_s", ".2f"), ("mean_ttft_s", ".3f"), ("mean_tpot_s", ".4f"), ("preemptions", "d"),
           ("peak_mapped_MiB", ".2f"), ("mean_used_fraction_of_mapped", ".3f"),
           ("mean_used_fraction_of_held", ".3f"), ("map_wait_seconds", ".4f"),
           ("throughput_ratio", ".3f"), ("peak_mapped_ratio", ".3f")]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dist", default="sharegpt", choices=sorted(DISTS))
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--scale", type=float, default=0.25, help="multiply every length by this (0, 1]")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests/s (default: all at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model directory (default: a random model of --preset)")
    ap.add_argument("--preset", default="small", help="random llama preset (benchmarks.common.PRESETS)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--page-sizes", default="64K", help="vAttention page sizes to run, comma-separated "
                    "(cuda: the driver granularity, 2M, unless a patched driver allows less)")
    ap.add_argument("--kv-layouts", default="per_layer",
                    help="vAttention layouts to run, comma-separated: per_layer (a K and a V tensor per layer) "
                         "and/or interleaved (one tensor; a page holds every layer of a few tokens)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-memory", default="32M", help="physical KV pool per path")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the workload's longest request")
    ap.add_argument("--preemption-mode", default=None, choices=[None, "recompute", "swap"])
    ap.add_argument("--contiguous-kernel", default="auto",
                    help="vAttention attention kernel: auto, sdpa, torch_flash, flash_attn or triton")
    ap.add_argument("--repeats", type=int, default=1, help="runs per path (round-robin); the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: on a loaded machine more threads make timings erratic)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<machine>/compare_<dist>.json)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads or 1)
    args.kv_memory = parse_size(args.kv_memory)
    page_sizes = [parse_size(s) for s in args.page_sizes.split(",") if s.strip()]
    if not page_sizes:
        raise ValueError("--page-sizes: give at least one page size")
    model, model_label = resolve_model(args.model, args.preset, device)
    from vattn.loader import read_config

    vocab = int(read_config(model)["vocab_size"])
    wl = make_workload(args.dist, args.num_requests, args.scale, args.seed, vocab, args.rate)
    args.max_model_len = args.max_model_len or wl.max_total_len
    if args.max_model_len < wl.max_total_len:
        raise ValueError(f"--max-model-len {args.max_model_len} is below the workload's longest request "
                         f"({wl.max_total_len} tokens)")
    command = command_line("benchmarks.compare", argv)
    head = header(device, command, {"model": model_label, "workload": wl.summary(), "kv_memory_bytes": args.kv_memory,
                                    "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                                    "block_size": args.block_size, "page_sizes": page_sizes})

    layouts = [x.strip() for x in args.kv_layouts.split(",") if x.strip()]
    paths = [("paged", None, "per_layer")] + [("vattention", ps, lay) for ps in page_sizes for lay in layouts]
    reps: list[list[dict]] = [[] for _ in paths]
    for _ in range(args.repeats):  # round-robin, so drifting load on a shared machine hits every path alike
        for i, (kind, ps, lay) in enumerate(paths):
            reps[i].append(run_path(model, kind, ps, device, wl, args, lay))
    near_ties = check_tokens([r for path_reps in reps for r in path_reps], wl)
    rows = []
    for path_reps in reps:  # the repeat with the median total time stands for the path
        ordered = sorted(path_reps, key=lambda r: r["metrics"]["total_time_s"])
        row = ordered[len(ordered) // 2]["metrics"]
        row["output_tokens_per_s_all_repeats"] = [r["metrics"]["output_tokens_per_s"] for r in path_reps]
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["peak_mapped_MiB"] = r["peak_mapped_bytes"] / 2**20
        r["throughput_ratio"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        r["peak_mapped_ratio"] = r["peak_mapped_bytes"] / base["peak_mapped_bytes"]
        r["mean_mapped_ratio"] = r["mean_mapped_bytes"] / base["mean_mapped_bytes"]
    head["load_avg_end"] = load_average()
    payload = {**head, "tokens_identical_across_paths": near_ties == 0, "near_tie_divergences": near_ties,
               "results": rows,
               "ratios_note": "throughput_ratio and *_mapped_ratio are this path / paged, measured in this run"}
    s = wl.summary()
    text = "\n".join([
        header_text(head),
        f"model: {model_label}; workload: {s['num_requests']} {s['dist']}-like requests x{s['scale']} "
        f"({s['arrival']}), prompt mean {s['prompt_mean']:.1f} max {s['prompt_max']}, output mean "
        f"{s['output_mean']:.1f} max {s['output_max']}; KV pool {args.kv_memory / 2**20:.0f} MiB per path, "
        f"max_num_seqs {args.max_num_seqs}, block size {args.block_size}",
        format_table(COLUMNS, rows),
        "greedy output tokens identical on every path: " + (
            "yes (checked)" if near_ties == 0 else
            f"yes but for {near_ties} request(s) that diverged at a near-tie (top-2 within {NEAR_TIE} nats, checked)"),
        f"median of {args.repeats} round-robin repeat(s) per path; "
        "ratios = path / paged from this run; used_fraction_of_mapped = live-token bytes / mapped bytes (vAttention "
        "keeps finished rows mapped for reuse), _of_held = / bytes held by live sequences; means over steps",
    ])
    print(text)
    out = args.out or results_dir(device) / f"compare_{args.dist}{'' if args.rate is None else '_poisson'}.json"
    write_results(out, payload, text)
    return payload


if __name__ == "__main__":
    main()
