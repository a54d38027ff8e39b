"""`vattn bench memory`: how well each KV path uses the same memory budget, and what sharing saves.

    vattn bench memory --model llama-4l-h128 --workload sharegpt --scale 0.25 --num-requests 48 \
        --page-sizes 4K,64K --block-sizes 16 --kv-memory 4M

Utilization (one run per path, same requests, same KV byte budget): the share of mapped bytes holding live tokens,
averaged over steps (`used_of_mapped`; vAttention keeps rows a finished sequence left mapped, for reuse) and over the
units held by live sequences only (`used_of_held`); peak concurrent sequences; preemptions; peak mapped MiB. The
static baseline (every request reserves max_model_len up front) is the waste the vLLM paper's 20.4-38.2% describes.

Sharing (--sharing, on by default): per path, physical KV units held by live sequences (a shared unit counts once),
peak and mean over the run, with sharing vs without:
  parallel       the requests with n samples (forked from one prefilled prompt) vs n independent requests each
  beam           beam search of width k vs k independent greedy requests
  shared-prefix  few-shot requests sharing one prefix, prefix caching on vs off (the first request runs alone until
                 its prompt is computed, then the rest arrive)
saved = 1 - shared / unshared. vLLM paper (Alpaca): 6.1-9.8% parallel, 37.6-55.2% beam.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from vattn.bench import options
from vattn.bench.engines import EngineSpec, RunOptions, engine_config, run_vattn
from vattn.bench.models import read_config, resolve_model
from vattn.bench.report import Report, command_line
from vattn.bench.workloads import make_workload, workload_from_args
from vattn.cli import parse_size
from vattn.engine import LLMEngine


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vattn bench memory", description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="vattention,paged,static",
                    help="vattn paths: vattention (x page sizes x layouts), paged (x block sizes), static")
    ap.add_argument("--sharing", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure memory saved by sharing (default: on)")
    ap.add_argument("--sharing-requests", type=int, default=4, help="Alpaca-like requests per sharing run")
    ap.add_argument("--widths", default="2,4", help="n (parallel sampling) and k (beam width) values")
    ap.add_argument("--sharing-kv-memory", default=None, type=parse_size,
                    help="KV pool of the sharing runs: roomy, so that sharing, not preemption, sets what is held "
                         "(default: the larger of 64M and --kv-memory)")
    ap.add_argument("--name", default=None, help="result file name (default: memory_<workload>)")
    options.add_model_args(ap)
    options.add_workload_args(ap, default="sharegpt", num_requests=48, input_len=None, output_len=None)
    options.add_engine_args(ap, kv_memory="4M", max_num_seqs=32)
    options.add_output_args(ap)
    return ap


COLUMNS = [("path", "s"), ("tokens_per_unit", "d"), ("used_of_mapped", ".3f"), ("used_of_held", ".3f"),
           ("peak_running", "d"), ("preemptions", "d"), ("peak_mapped_MiB", ".2f"), ("output_tokens_per_s", ".1f"),
           ("map_wait_seconds", ".4f")]
SHARING_COLUMNS = [("path", "s"), ("tokens_per_unit", "d"), ("mode", "s"), ("width", "d"),
                   ("shared_peak_units", "d"), ("unshared_peak_units", "d"), ("saved_peak_pct", ".1f"),
                   ("shared_mean_units", ".1f"), ("unshared_mean_units", ".1f"), ("saved_mean_pct", ".1f")]


def held_units(engine: LLMEngine, requests: list[tuple[str, list[int], object]], first_alone: bool = False) -> dict:
    """Submit (id, prompt, params) all at once (or, with `first_alone`, the first one until its prompt is computed,
    so a prefix cache holds it, then the rest), run to completion; units held by live sequences every step."""
    held, tokens = [], {}
    pre0 = engine.stats().num_preemptions
    if first_alone:
        rid, prompt, params = requests[0]
        engine.add_request(rid, None, params, prompt_token_ids=prompt)
        done = False
        while not done:
            for out in engine.step():
                done = done or bool(out.outputs and out.outputs[0].token_ids)
                if out.finished:
                    tokens[out.request_id] = [list(o.token_ids) for o in out.outputs]
            st = engine.kv_stats()
            held.append(st.units_total - st.units_free)
        requests = requests[1:]
    for rid, prompt, params in requests:
        engine.add_request(rid, None, params, prompt_token_ids=prompt)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = [list(o.token_ids) for o in out.outputs]
        st = engine.kv_stats()
        held.append(st.units_total - st.units_free)
    empty = [rid for rid, outs in tokens.items() if not outs or any(not t for t in outs)]
    if empty:
        raise RuntimeError(f"requests finished without output (KV pool too small?): {empty[:5]}")
    return {"peak": max(held), "mean": statistics.mean(held), "tokens": tokens,
            "preemptions": engine.stats().num_preemptions - pre0, "unit_bytes": st.page_bytes,
            "tokens_per_unit": st.tokens_per_unit}


def sharing_rows(spec: EngineSpec, opts: RunOptions, model_cfg: dict, args) -> list[dict]:
    from vattn.bench.workloads import first_regular_id
    from vattn.sampling_params import SamplingParams

    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    if not widths or min(widths) < 2:
        raise ValueError(f"--widths must be integers >= 2, got {args.widths!r}")
    vocab, first = int(model_cfg["vocab_size"]), first_regular_id(model_cfg)
    base = make_workload("alpaca", args.sharing_requests, args.scale, args.seed, vocab, first_id=first)
    prefixed = make_workload("shared-prefix", args.sharing_requests, args.scale, args.seed, vocab, first_id=first,
                             prefix_len=args.prefix_len)
    longest = max(base.max_total_len, prefixed.max_total_len)
    pool = args.sharing_kv_memory or max(64 << 20, opts.kv_memory)
    sized = RunOptions(**{**opts.__dict__, "kv_memory": pool,
                          "max_num_seqs": args.sharing_requests * max(widths),
                          "max_model_len": longest + 1, "enable_prefix_caching": False, "progress": False})
    rows = []

    def row(mode: str, width: int, sh: dict, un: dict) -> dict:
        return {"path": spec.label, "mode": mode, "width": width, "tokens_per_unit": sh["tokens_per_unit"],
                "unit_bytes": sh["unit_bytes"], "shared_peak_units": sh["peak"], "unshared_peak_units": un["peak"],
                "shared_peak_bytes": sh["peak"] * sh["unit_bytes"], "unshared_peak_bytes": un["peak"] * un["unit_bytes"],
                "saved_peak_pct": 100 * (1 - sh["peak"] / un["peak"]), "shared_mean_units": sh["mean"],
                "unshared_mean_units": un["mean"], "saved_mean_pct": 100 * (1 - sh["mean"] / un["mean"]),
                "preemptions": sh["preemptions"] + un["preemptions"]}

    engine = LLMEngine(engine_config(spec, sized))
    try:
        for w in widths:
            reqs = base.requests
            sh = held_units(engine, [(f"p{w}-{i}", r.prompt_token_ids, SamplingParams(
                n=w, temperature=1.0, seed=1000 * i, max_tokens=r.max_tokens, ignore_eos=True))
                for i, r in enumerate(reqs)])
            un = held_units(engine, [(f"u{w}-{i}-{j}", r.prompt_token_ids, SamplingParams(
                temperature=1.0, seed=1000 * i + j, max_tokens=r.max_tokens, ignore_eos=True))
                for i, r in enumerate(reqs) for j in range(w)])
            for i in range(len(reqs)):  # sample j of a request is seeded like independent request j
                if sh["tokens"][f"p{w}-{i}"] != [un["tokens"][f"u{w}-{i}-{j}"][0] for j in range(w)]:
                    raise AssertionError(f"{spec.label}: the n={w} samples of request {i} differ from the "
                                         "independent requests seeded alike")
            rows.append(row("parallel", w, sh, un))
            sh = held_units(engine, [(f"b{w}-{i}", r.prompt_token_ids, SamplingParams(
                use_beam_search=True, beam_width=w, max_tokens=r.max_tokens, ignore_eos=True, temperature=0))
                for i, r in enumerate(reqs)])
            un = held_units(engine, [(f"g{w}-{i}-{j}", r.prompt_token_ids, SamplingParams(
                temperature=0, max_tokens=r.max_tokens, ignore_eos=True)) for i, r in enumerate(reqs)
                for j in range(w)])
            rows.append(row("beam", w, sh, un))
        greedy = [(r.request_id, r.prompt_token_ids, SamplingParams(temperature=0, max_tokens=r.max_tokens,
                                                                    ignore_eos=True)) for r in prefixed.requests]
        un = held_units(engine, greedy, first_alone=True)
    finally:
        engine.close()
    cached = LLMEngine(engine_config(spec, RunOptions(**{**sized.__dict__, "enable_prefix_caching": True})))
    try:
        sh = held_units(cached, greedy, first_alone=True)
    finally:
        cached.close()
    rows.append(row("shared-prefix", len(prefixed.requests), sh, un))
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    options.positive(args, "num_requests", "max_num_seqs", "sharing_requests")
    device = options.resolve_device(args.device)
    options.set_threads(args.threads)
    model, model_label = resolve_model(args.model, device)
    cfg = read_config(model)
    wl = workload_from_args(args, cfg)
    if wl.kind in ("parallel", "beam"):
        raise ValueError("memory: sharing is measured separately (--sharing); give a single-sample workload")
    from vattn.bench.throughput import engine_specs, run_options

    opts = run_options(args, model, wl, device)
    specs = engine_specs(args, device)
    bad = [s.label for s in specs if s.kind not in ("vattention", "paged", "static")]
    if bad:
        raise ValueError(f"memory measures vattn's own paths; not {bad}")
    report = Report("memory", device, command_line(["memory", *argv]),
                    options.out_path(args, device, args.name or f"memory_{wl.kind}"),
                    {"model": model_label, "workload": wl.summary(), "kv_memory_bytes": opts.kv_memory,
                     "max_num_seqs": opts.max_num_seqs, "max_model_len": opts.max_model_len})
    rows, traces = [], {}
    for spec in specs:
        res = run_vattn(spec, wl, opts)
        m = res.metrics
        rows.append({"path": spec.label, "kind": spec.kind, "tokens_per_unit": m["tokens_per_unit"],
                     "unit_bytes": m["unit_bytes"], "used_of_mapped": m["mean_used_fraction_of_mapped"],
                     "used_of_held": m["mean_used_fraction_of_held"], "peak_running": m["peak_running"],
                     "preemptions": m["preemptions"], "peak_mapped_MiB": m["peak_mapped_bytes"] / 2**20,
                     "mean_mapped_MiB": m["mean_mapped_bytes"] / 2**20, "peak_used_MiB": m["peak_used_bytes"] / 2**20,
                     "output_tokens_per_s": m["output_tokens_per_s"], "map_wait_seconds": m["map_wait_seconds"],
                     "steps": m["steps"]})
        traces[spec.label] = res.samples
    sharing = []
    if args.sharing:
        for spec in specs:
            if spec.kind != "static":  # one page per row: nothing to share below a whole row
                sharing += sharing_rows(spec, opts, cfg, args)
    notes = [f"workload: {wl.describe()}",
             f"KV pool {opts.kv_memory / 2**20:.1f} MiB per path, max_num_seqs {opts.max_num_seqs}, max_model_len "
             f"{opts.max_model_len}; used_of_mapped = live-token bytes / mapped bytes, used_of_held = / bytes held "
             "by live sequences, means over steps; static = a page per row (max_model_len tokens reserved)"]
    if sharing:
        pool = args.sharing_kv_memory or max(64 << 20, opts.kv_memory)
        notes.append(f"sharing: {args.sharing_requests} Alpaca-like requests, a {pool / 2**20:.0f} MiB "
                     "pool; units = physical KV units held by live "
                     "sequences, a shared unit counts once; saved = 1 - shared / unshared (parallel: n samples vs n "
                     "requests; beam: width k vs k greedy requests; shared-prefix: prefix caching on vs off). vLLM "
                     "paper: 6.1-9.8% parallel, 37.6-55.2% beam")
    tables = [("sharing", "memory saved by sharing", SHARING_COLUMNS, sharing)] if sharing else []
    payload = report.finish(rows, COLUMNS, notes, tables=tables)
    if not args.no_plot:
        from vattn.bench.plots import memory_plot

        memory_plot(report.plot_path(), traces, f"{model_label}: KV memory over the run\n{wl.describe()}")
    return payload
