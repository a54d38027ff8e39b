"""`vattn bench roofline`: decode step time against the memory-bandwidth bound, for each path.

    vattn bench roofline --model llama-8l-h512 --batch 1,16,64 --context 256

A decode step must read every weight once and every live token's K and V in every layer. Its bound is
(weight bytes + live KV bytes) / copy bandwidth, with the bandwidth measured here by timing large tensor copies
(bytes read + bytes written per second, best of several). For each path and batch size: B requests of --context
prompt tokens are prefilled, then --steps pure decode steps are timed one by one. `fraction_of_bound` = bound
time / measured step time (1.0 = the step runs at memory speed; small = time goes elsewhere: Python, kernel
launches, compute).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from vattn.bench import options
from vattn.bench.engines import RunOptions, engine_config
from vattn.bench.models import read_config, resolve_model, weight_bytes
from vattn.bench.report import Report, command_line
from vattn.bench.workloads import first_regular_id, make_workload
from vattn.engine import LLMEngine
from vattn.sampling_params import SamplingParams


def copy_bandwidth(device: str, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second a tensor copy moves (read + write), best of `repeats`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dst.copy_(src)  # touch both
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def decode_steps(engine: LLMEngine, batch: int, context: int, steps: int, model_cfg: dict, seed: int,
                 sync) -> list[tuple[float, int, int]]:
    """(seconds, live KV bytes read, sequences running) of each of `steps` decode-only steps with `batch` sequences
    of ~`context` tokens (fewer run if the KV pool cannot hold them all: the row reports it)."""
    # chunked prefill lets early sequences decode while later ones prefill: give every sequence enough tokens to
    # still be decoding through all the timed steps
    prefill_steps = -(-batch * context // engine.config.max_num_batched_tokens)
    wl = make_workload("fixed", batch, 1.0, seed, int(model_cfg["vocab_size"]), first_id=first_regular_id(model_cfg),
                       input_len=context, output_len=steps + prefill_steps + 3)
    for r in wl.requests:
        engine.add_request(r.request_id, None, SamplingParams(temperature=0, max_tokens=r.max_tokens,
                                                              ignore_eos=True), prompt_token_ids=r.prompt_token_ids)
    started: set[str] = set()
    while len(started) < batch:  # prefill (possibly chunked) until every sequence has its first token
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                started.add(out.request_id)
    samples = []
    for _ in range(steps):
        kv, running = engine.kv_stats().used_bytes, engine.stats().num_running
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        samples.append((time.perf_counter() - t0, kv, running))
    while engine.has_unfinished_requests():
        engine.step()
    return samples


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[2:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="vattn bench roofline", description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="vattention,paged,static", help="vattn paths to measure")
    ap.add_argument("--batch", default="1,16,64", help="decode batch sizes, comma-separated")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per point")
    ap.add_argument("--seed", type=int, default=0)
    options.add_model_args(ap)
    options.add_engine_args(ap, kv_memory="1G", max_num_seqs=64)
    options.add_output_args(ap)
    args = ap.parse_args(argv)
    options.positive(args, "context", "steps")
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch must be positive integers, got {args.batch!r}")
    device = options.resolve_device(args.device)
    options.set_threads(args.threads)
    model, model_label = resolve_model(args.model, device)
    cfg = read_config(model)
    from vattn.bench.throughput import engine_specs

    specs = engine_specs(args, device)
    if any(s.kind not in ("vattention", "paged", "static") for s in specs):
        raise ValueError("roofline measures vattn's own paths (vattention, paged, static)")
    wbytes = weight_bytes(model)
    bw = copy_bandwidth(device)
    report = Report("roofline", device, command_line(["roofline", *argv]), options.out_path(args, device, "roofline"),
                    {"model": model_label, "weight_bytes": wbytes, "copy_bandwidth_bytes_per_s": bw,
                     "context": args.context, "steps": args.steps})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for spec in specs:
        opts = RunOptions(model=model, device=device, dtype=args.dtype, kv_memory=args.kv_memory,
                          max_num_seqs=max(max(batches), args.max_num_seqs),
                          max_model_len=args.max_model_len or args.context + args.steps + 3 + -(
                              -max(batches) * args.context // args.max_num_batched_tokens),
                          max_num_batched_tokens=args.max_num_batched_tokens, attention_kernel=args.attention_kernel)
        engine = LLMEngine(engine_config(spec, opts))
        try:
            decode_steps(engine, 1, min(args.context, 16), 2, cfg, args.seed, sync)  # warm-up
            for b in batches:
                samples = decode_steps(engine, b, args.context, args.steps, cfg, args.seed, sync)
                step_s = statistics.median(t for t, _, _ in samples)
                kv = statistics.median(k for _, k, _ in samples)
                running = min(r for _, _, r in samples)
                bound_s = (wbytes + kv) / bw
                rows.append({"path": spec.label, "batch": b, "running": running, "context": args.context,
                             "median_step_ms": step_s * 1e3, "min_step_ms": min(t for t, _, _ in samples) * 1e3, "weight_MiB": wbytes / 2**20,
                             "kv_MiB": kv / 2**20, "bound_ms": bound_s * 1e3, "fraction_of_bound": bound_s / step_s,
                             "decode_tokens_per_s": b / step_s})
        finally:
            engine.close()
    cols = [("path", "s"), ("batch", "d"), ("running", "d"), ("context", "d"), ("median_step_ms", ".2f"), ("bound_ms", ".3f"),
            ("fraction_of_bound", ".3f"), ("weight_MiB", ".1f"), ("kv_MiB", ".2f"), ("decode_tokens_per_s", ".1f")]
    notes = [f"copy bandwidth {bw / 1e9:.2f} GB/s (read + write, best of 5 copies of 256 MiB); weights read per step "
             f"{wbytes / 2**20:.1f} MiB; bound = (weights + live KV) / bandwidth; fraction_of_bound = bound / "
             "median step time; running = fewest sequences decoding in a timed step (below batch: the KV pool "
             "could not hold them all, raise --kv-memory)"]
    payload = report.finish(rows, cols, notes)
    if not args.no_plot:
        from vattn.bench.plots import bars_plot

        bars_plot(report.plot_path(), [f"{r['path']} b{r['batch']}" for r in rows],
                  [r["fraction_of_bound"] for r in rows], "fraction of the memory-bandwidth bound",
                  f"{model_label}: decode steps, context {args.context}")
    return payload
