"""`vattn bench throughput`: offline, every request at once (or Poisson arrivals with --rate, vattn's paths only),
the same requests on the same model through each engine, in one run.

    vattn bench throughput --model llama-4l-h128 --workload fixed --input-len 128 --output-len 128 \
        --num-requests 128 --engines vattention,paged,static,hf,vllm

Per engine: requests/s, output and total tokens/s, and each one's ratio to the first engine's; for vattn's paths also
TTFT/TPOT, preemptions, mapped KV memory and the page-mapping wait. Engines run one after the other, round-robin
when --repeats > 1 (the median repeat stands for the engine). Greedy tokens of vattn's paths are checked equal
(vattn/bench/tokens.py); the results are written whatever the check finds, and a mismatch then fails the command.
"""

from __future__ import annotations

import argparse
import sys

import torch

from vattn.bench import options
from vattn.bench.engines import (
    VATTN_KINDS,
    EngineResult,
    EngineSpec,
    RunOptions,
    engine_config,
    parse_engines,
    run_engine,
)
from vattn.bench.models import read_config, resolve_model
from vattn.bench.peers import vllm_binding
from vattn.bench.report import Report, command_line
from vattn.bench.tokens import TokenCheck, check_tokens, near_tie_tolerance
from vattn.bench.workloads import Workload, workload_from_args


class TokenMismatchError(AssertionError):
    """Two of vattn's KV paths produced different greedy tokens for the same request (not a near-tie)."""


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="vattn bench throughput", description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="vattention,paged,static,hf,vllm",
                    help="comma-separated, the first is the ratios' base: vattention, paged, static, hf, vllm "
                         "(default: %(default)s; a peer that is not installed gets a row saying so)")
    ap.add_argument("--rate", type=float, default=None,
                    help="Poisson arrivals, requests/s (vattn's paths only; default: all at once)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per engine, round-robin; the median is reported")
    ap.add_argument("--hf-batch-size", type=int, default=None, help="transformers static batch (default: max-num-seqs)")
    ap.add_argument("--check-tokens", action=argparse.BooleanOptionalAction, default=True,
                    help="check that vattn's paths give the same greedy tokens (default: on)")
    ap.add_argument("--tensor-parallel-size", default="1",
                    help="vattn's paths at each of these tensor-parallel sizes, a row per size: e.g. 1,2 "
                         "(default: %(default)s)")
    ap.add_argument("--name", default=None, help="result file name (default: throughput_<workload>[_<model>])")
    options.add_model_args(ap)
    options.add_workload_args(ap)
    options.add_engine_args(ap)
    options.add_output_args(ap)
    return ap


COLUMNS = [("engine", "s"), ("requests_per_s", ".2f"), ("output_tokens_per_s", ".1f"),
           ("total_tokens_per_s", ".1f"), ("output_ratio", ".3f"), ("elapsed_s", ".2f"), ("mean_ttft_s", ".3f"),
           ("mean_tpot_s", ".4f"), ("preemptions", "d"), ("peak_mapped_MiB", ".1f"),
           ("mean_used_fraction_of_mapped", ".3f"), ("map_wait_seconds", ".4f"), ("note", "s")]


def run_options(args, model: str, wl: Workload, device: str) -> RunOptions:
    max_len = args.max_model_len or wl.max_total_len
    if max_len < wl.max_total_len:
        raise ValueError(f"--max-model-len {max_len} is below the workload's longest request "
                         f"({wl.max_total_len} tokens)")
    return RunOptions(model=model, device=device, dtype=args.dtype, kv_memory=args.kv_memory,
                      max_num_seqs=args.max_num_seqs, max_model_len=max_len,
                      max_num_batched_tokens=args.max_num_batched_tokens, preemption_mode=args.preemption_mode,
                      attention_kernel=args.attention_kernel, enable_prefix_caching=args.prefix_caching,
                      hf_batch_size=getattr(args, "hf_batch_size", None), threads=torch.get_num_threads(),
                      progress=not args.no_progress)


def engine_specs(args, device: str) -> list[EngineSpec]:
    pages = options.split_sizes(args.page_sizes, "2M" if device == "cuda" else "64K", "--page-sizes")
    layouts = [x.strip() for x in args.kv_layouts.split(",") if x.strip()]
    blocks = [int(b) for b in args.block_sizes.split(",") if b.strip()]
    tp = getattr(args, "tensor_parallel_size", "1")
    try:
        tp_sizes = [int(x) for x in str(tp).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--tensor-parallel-size: not a list of ints: {tp!r}") from None
    if not tp_sizes or min(tp_sizes) < 1:
        raise ValueError(f"--tensor-parallel-size: sizes must be >= 1, got {tp!r}")
    return parse_engines(args.engines, pages, layouts, blocks, tp_sizes)


def logprob_gap_fn(spec: EngineSpec, opts: RunOptions):
    """gap_of(prompt, a, b) -> (logprob of a, logprob of b) on `spec`'s path, recomputed for that prefix alone;
    one engine built on first use."""
    from vattn.engine import LLMEngine
    from vattn.sampling_params import MAX_LOGPROBS, SamplingParams

    state: dict = {}

    def gap_of(prompt: list[int], a: int, b: int):
        if "engine" not in state:
            state["engine"] = LLMEngine(engine_config(spec, opts))
        eng = state["engine"]
        rid = f"tie-{len(state)}"
        state[rid] = True
        eng.add_request(rid, None, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                                  logprobs=MAX_LOGPROBS), prompt_token_ids=prompt)
        out = None
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    out = o
        lp = out.outputs[0].logprobs[0]
        if a not in lp or b not in lp:
            return None
        return float(lp[a]), float(lp[b])

    def close():
        if "engine" in state:
            state["engine"].close()

    gap_of.close = close  # type: ignore[attr-defined]
    return gap_of


def median_result(reps: list[EngineResult]) -> EngineResult:
    ok = [r for r in reps if r.error is None]
    if not ok:
        return reps[0]
    ok.sort(key=lambda r: r.metrics["elapsed_s"])
    res = ok[len(ok) // 2]
    res.metrics["output_tokens_per_s_all_repeats"] = [r.metrics["output_tokens_per_s"] for r in ok]
    return res


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    options.positive(args, "repeats", "num_requests", "max_num_seqs", "hf_batch_size")
    device = options.resolve_device(args.device)
    options.set_threads(args.threads)
    model, model_label = resolve_model(args.model, device)
    cfg = read_config(model)
    wl = workload_from_args(args, cfg)
    opts = run_options(args, model, wl, device)
    specs = engine_specs(args, device)
    from vattn.bench.peers import vllm_cores, vllm_version

    if any(s.kind == "vllm" for s in specs):
        vllm_cores(opts.threads)  # more threads than cores: the error now, before any engine runs

    name = args.name or f"throughput_{wl.kind}"
    report = Report("throughput", device, command_line(["throughput", *argv]),
                    options.out_path(args, device, name),
                    {"model": model_label, "model_dir": model, "workload": wl.summary(),
                     "kv_memory_bytes": opts.kv_memory, "max_num_seqs": opts.max_num_seqs,
                     "max_model_len": opts.max_model_len, "max_num_batched_tokens": opts.max_num_batched_tokens,
                     "prefix_caching": opts.enable_prefix_caching, "repeats": args.repeats})
    if any(s.kind == "vllm" for s in specs) and vllm_version():
        report.header["versions"]["vllm"] = vllm_version()
    reps: list[list[EngineResult]] = [[] for _ in specs]
    for _ in range(args.repeats):  # round-robin: drifting load on a shared machine hits every engine alike
        for i, spec in enumerate(specs):
            if reps[i] and reps[i][0].error:
                continue  # a peer that failed once is not retried
            res = run_engine(spec, wl, opts)
            reps[i].append(res)
            print(f"[throughput] {spec.label}: " + (res.error[:200] if res.error else
                  f"{res.metrics['output_tokens_per_s']:,.1f} output tokens/s"), file=sys.stderr, flush=True)
    results = [median_result(r) for r in reps]

    # greedy token check between vattn's paths (sampled workloads are not comparable token by token)
    chk = TokenCheck()
    vattn_ok = [r for r in results if r.spec.kind in VATTN_KINDS and r.error is None]
    dtype = torch.bfloat16 if (args.dtype == "bfloat16" or (args.dtype == "auto" and device == "cuda")) else (
        torch.float16 if args.dtype == "float16" else torch.float32)
    if args.check_tokens and len(vattn_ok) > 1 and wl.kind not in ("parallel", "beam"):
        gap_of = logprob_gap_fn(vattn_ok[0].spec, opts)
        try:
            chk = check_tokens(vattn_ok[0].spec.label, vattn_ok[0].tokens,
                               {r.spec.label: r.tokens for r in vattn_ok[1:]},
                               {r.request_id: r.prompt_token_ids for r in wl.requests}, gap_of, dtype)
        finally:
            gap_of.close()

    rows = []
    base = next((r for r in results if r.error is None), None)
    for r in results:
        if r.error is not None:
            rows.append({"engine": r.spec.label, "kind": r.spec.kind, "note": r.error})
            continue
        m = dict(r.metrics)
        m["output_ratio"] = m["output_tokens_per_s"] / base.metrics["output_tokens_per_s"]
        m["requests_ratio"] = m["requests_per_s"] / base.metrics["requests_per_s"]
        m["total_ratio"] = m["total_tokens_per_s"] / base.metrics["total_tokens_per_s"]
        if "peak_mapped_bytes" in m:
            m["peak_mapped_MiB"] = m["peak_mapped_bytes"] / 2**20
        if r.spec.kind == "vllm":
            m["note"] = vllm_binding(opts.threads)
        elif r.spec.kind == "hf":
            m["note"] = f"static batches of {m['batch_size']}"
        rows.append(m)
    vllm_rows = [r for r in results if r.spec.kind == "vllm" and r.error is None]
    if vllm_rows and vllm_rows[0].metrics["vllm_kv_cache_space_gib"] * 2**30 != opts.kv_memory:
        print(f"[throughput] note: vLLM's KV space is {vllm_rows[0].metrics['vllm_kv_cache_space_gib']} GiB (whole "
              f"GiB only) against {opts.kv_memory / 2**20:.0f} MiB for vattn's paths", file=sys.stderr)
    tol = f"top-2 within {near_tie_tolerance(dtype):.3g} nats ({str(dtype).removeprefix('torch.')})"
    notes = [f"workload: {wl.describe()}",
             f"KV pool {opts.kv_memory / 2**20:.0f} MiB per vattn path; max_num_seqs {opts.max_num_seqs}, "
             f"max_model_len {opts.max_model_len}; {torch.get_num_threads()} torch threads (vattn, transformers)"
             + ("; " + vllm_binding(opts.threads) if vllm_rows else ""),
             chk.sentence(tol),
             *([f"KV budgets differ: vLLM's CPU KV space is set in whole GiB ({vllm_rows[0].metrics['vllm_kv_cache_space_gib']}"
                f" GiB here); give --kv-memory in whole GiB for equal budgets"]
               if vllm_rows and vllm_rows[0].metrics["vllm_kv_cache_space_gib"] * 2**30 != opts.kv_memory else []),
             f"median of {args.repeats} round-robin repeat(s); output_ratio = engine / {base.spec.label if base else '-'}"
             " output tokens/s, same run"]
    payload = report.finish(rows, COLUMNS, notes, {"token_check": chk.as_dict()})
    if not args.no_plot and base is not None:
        from vattn.bench.plots import throughput_plot

        throughput_plot(report.plot_path(), rows, f"{model_label}\n{wl.describe()}")
    if chk.mismatches:
        raise TokenMismatchError(chk.sentence(tol))
    return payload
