"""The engines a benchmark compares, each run on the same model and the same requests:

- `vattention`: vattn's virtually contiguous KV cache (one engine per page size and layout asked for),
- `paged`: vattn's block-table path,
- `static`: vattn with every request reserving `max_model_len` tokens up front (the pre-PagedAttention baseline the
  vLLM paper measured against): the vAttention cache with one page per row, so a sequence's first token maps its
  whole row,
- `hf`: transformers `generate` in static batches (left-padded, every batch runs to its longest request),
- `vllm`: vLLM's offline `LLM.generate`, in its own process and environment (vattn/bench/peers.py).

Every runner returns an EngineResult: its metrics, or the reason it did not run. vattn's runners drive
`LLMEngine.add_request` / `step()` themselves, so they also time TTFT/TPOT and sample the KV statistics every step
(off the clock).
"""

from __future__ import annotations

import bisect
import dataclasses
import statistics
import time
import zlib
from dataclasses import dataclass, field

import torch

from vattn.bench.workloads import BenchRequest, Workload
from vattn.cli import parse_size
from vattn.config import EngineConfig
from vattn.engine import LLMEngine
from vattn.sampling_params import SamplingParams

VATTN_KINDS = ("vattention", "paged", "static")
ENGINE_KINDS = (*VATTN_KINDS, "hf", "vllm")


@dataclass
class EngineSpec:
    """One row of a comparison: an engine kind and, for vattn's paths, the KV layout it runs."""

    kind: str
    page_size: int | None = None  # vattention
    kv_layout: str = "per_layer"  # vattention
    block_size: int = 16  # paged
    tensor_parallel_size: int = 1  # vattn's paths: ranks the model is split over

    @property
    def label(self) -> str:
        tp = f"/tp{self.tensor_parallel_size}" if self.tensor_parallel_size > 1 else ""
        if self.kind == "vattention":
            from vattn.bench.report import size_label

            return (f"vattention@{size_label(self.page_size)}" if self.page_size else "vattention") + (
                "/interleaved" if self.kv_layout == "interleaved" else "") + tp
        if self.kind == "paged" and self.block_size != 16:
            return f"paged@{self.block_size}{tp}"
        return {"hf": "transformers", "vllm": "vllm"}.get(self.kind, self.kind) + tp


@dataclass
class EngineResult:
    spec: EngineSpec
    metrics: dict = field(default_factory=dict)
    tokens: dict[str, list[int]] | None = None  # request id -> output tokens (first sample), where known
    error: str | None = None  # why this engine has no numbers (not installed, failed): its row says so
    samples: list[dict] = field(default_factory=list)  # per-step KV samples (vattn engines)


def parse_engines(text: str, page_sizes: list[int | None], layouts: list[str], block_sizes: list[int],
                  tp_sizes: list[int] = (1,)) -> list[EngineSpec]:
    """'vattention,paged,static,hf,vllm' -> specs; vattention expands over page sizes x layouts, paged over block
    sizes, and vattn's paths over tensor-parallel sizes (a row per size)."""
    names = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in names if e not in ENGINE_KINDS]
    if bad or not names:
        raise ValueError(f"--engines: unknown engine(s) {bad or text!r}; choose from {', '.join(ENGINE_KINDS)}")
    specs = []
    for name in names:
        if name == "vattention":
            specs += [EngineSpec("vattention", ps, lay, tensor_parallel_size=tp)
                      for tp in tp_sizes for ps in page_sizes for lay in layouts]
        elif name == "paged":
            specs += [EngineSpec("paged", block_size=b, tensor_parallel_size=tp) for tp in tp_sizes for b in block_sizes]
        elif name == "static":
            specs += [EngineSpec("static", tensor_parallel_size=tp) for tp in tp_sizes]
        else:
            specs.append(EngineSpec(name))
    return specs


@dataclass
class RunOptions:
    """What every engine of one comparison shares."""

    model: str
    device: str = "cpu"
    dtype: str = "auto"
    kv_memory: int = 256 << 20  # physical KV pool per vattn path (and vLLM's KV cache space, rounded up to GiB)
    max_num_seqs: int = 128
    max_model_len: int = 2048
    max_num_batched_tokens: int = 4096
    preemption_mode: str | None = None
    attention_kernel: str = "auto"
    enable_prefix_caching: bool = False
    hf_batch_size: int | None = None  # None: max_num_seqs
    threads: int = 1
    logprobs: bool = False  # ask vattn for top-2 logprobs (the token check's near-tie proof)
    progress: bool = True


def sampling_params(r: BenchRequest, logprobs: bool = False, seed: int = 0) -> SamplingParams:
    """Greedy with ignore_eos (every request yields exactly max_tokens), seeded sampling for n > 1, or beams."""
    if r.beam_width:
        return SamplingParams(use_beam_search=True, beam_width=r.beam_width, max_tokens=r.max_tokens,
                              ignore_eos=True, temperature=0)
    if r.n > 1:
        return SamplingParams(n=r.n, temperature=1.0, seed=seed, max_tokens=r.max_tokens, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True, logprobs=2 if logprobs else None)


def static_page_size(model_config: dict, max_model_len: int, dtype_bytes: int, granularity: int) -> int:
    """A page as large as one row (max_model_len tokens of one layer's K or V), rounded up to the granularity."""
    heads = model_config["num_key_value_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // model_config["num_attention_heads"]
    row = max_model_len * heads * head_dim * dtype_bytes
    return -(-row // granularity) * granularity


def engine_config(spec: EngineSpec, opts: RunOptions) -> EngineConfig:
    page_size, kind, layout = spec.page_size, spec.kind, spec.kv_layout
    if kind == "static":
        from vattn.bench.models import read_config

        dtype_bytes = 2 if (opts.dtype in ("bfloat16", "float16") or (opts.dtype == "auto" and opts.device == "cuda")) else 4
        gran = parse_size("2M") if opts.device == "cuda" else 4096
        page_size, kind, layout = static_page_size(read_config(opts.model), opts.max_model_len, dtype_bytes, gran), \
            "vattention", "per_layer"
    return EngineConfig(
        model=opts.model, kv_cache=kind, device=opts.device, dtype=opts.dtype, kv_cache_memory=opts.kv_memory,
        page_size=page_size, kv_layout=layout, block_size=spec.block_size, max_num_seqs=opts.max_num_seqs,
        max_model_len=opts.max_model_len, max_num_batched_tokens=opts.max_num_batched_tokens,
        enable_prefix_caching=opts.enable_prefix_caching, preemption_mode=opts.preemption_mode,
        attention_kernel=opts.attention_kernel if kind == "vattention" else "auto",
        tensor_parallel_size=spec.tensor_parallel_size,
        # on CPU the ranks share the comparison's threads out (N ranks x threads/N: the same cores as TP=1)
        num_threads=max(1, opts.threads // spec.tensor_parallel_size) if spec.tensor_parallel_size > 1 else None)


def _kernel_name(engine: LLMEngine) -> str:
    """The attention kernel 'auto' resolved to (no public accessor: read where the KV manager exposes it)."""
    backend = getattr(getattr(engine, "kv", None), "attention_backend", None)
    return getattr(backend, "kernel", None) or engine.config.attention_kernel


def drive(engine: LLMEngine, wl: Workload, opts: RunOptions, sync, desc: str) -> EngineResult:
    """Run `wl` to completion on `engine`. The clock covers add_request and step() (idle gaps before a Poisson
    arrival are skipped, not slept); KV statistics are sampled after every step, off the clock."""
    from tqdm import tqdm

    pending = sorted(wl.requests, key=lambda r: r.arrival)
    arrival = {r.request_id: r.arrival for r in wl.requests}
    first, finish, tokens, logprobs, samples = {}, {}, {}, {}, []
    clock, steps = 0.0, 0
    # Offline (everything arrives at once), run the engine as LLM.generate does: only finished outputs are built
    # (vLLM's offline API does the same); the first token's time then comes from the engine's request metrics.
    offline = wl.rate is None and all(r.arrival == 0 for r in wl.requests)
    kind = "final_only" if offline else "cumulative"
    step_walls, step_clocks = [], []  # wall time and clock at the end of each step (the clock skips stats sampling)
    st0, pre0 = engine.kv_stats(), engine.stats().num_preemptions
    bar = tqdm(total=len(wl.requests), desc=desc, disable=not opts.progress, leave=False)
    while pending or engine.has_unfinished_requests():
        t0 = time.perf_counter()
        while pending and pending[0].arrival <= clock:
            r = pending.pop(0)
            params = dataclasses.replace(sampling_params(r, opts.logprobs, seed=zlib.crc32(r.request_id.encode())),
                                         output_kind=kind)
            engine.add_request(r.request_id, None, params, prompt_token_ids=r.prompt_token_ids)
        if not engine.has_unfinished_requests():
            clock = pending[0].arrival  # idle until the next arrival
            continue
        sync()
        outs = engine.step()
        sync()
        clock += time.perf_counter() - t0
        step_walls.append(time.time())
        step_clocks.append(clock)
        steps += 1
        for out in outs:
            rid = out.request_id
            if offline and out.finished and out.metrics.first_token_time:  # final_only: the step that saw it
                i = bisect.bisect_left(step_walls, out.metrics.first_token_time)
                first.setdefault(rid, step_clocks[min(i, len(step_clocks) - 1)])
            if rid not in first and out.outputs and out.outputs[0].token_ids:
                first[rid] = clock
            if out.finished:
                finish[rid] = clock
                first.setdefault(rid, clock)  # beam search answers once, at the end
                tokens[rid] = [list(o.token_ids) for o in out.outputs]
                logprobs[rid] = out.outputs[0].logprobs if out.outputs else None
                bar.update(1)
        st, es = engine.kv_stats(), engine.stats()
        samples.append({"t": clock, "mapped_bytes": st.mapped_bytes, "used_bytes": st.used_bytes,
                        "held_bytes": (st.units_total - st.units_free) * st.page_bytes,
                        "running": es.num_running, "waiting": es.num_waiting})
    bar.close()
    st = engine.kv_stats()
    missing = [r.request_id for r in wl.requests if r.request_id not in tokens]
    if missing:
        raise RuntimeError(f"requests never finished: {missing[:5]}")
    short = [r.request_id for r in wl.requests
             if len(tokens[r.request_id]) != (1 if r.beam_width else r.n)
             or any(len(t) != r.max_tokens for t in tokens[r.request_id])]
    if short:
        raise RuntimeError(f"requests ended early (aborted for lack of KV memory?): {short[:5]}")
    n_out = sum(r.output_tokens for r in wl.requests)
    n_in = sum(len(r.prompt_token_ids) for r in wl.requests)
    ttft = [first[rid] - arrival[rid] for rid in tokens]
    tpot = [(finish[rid] - first[rid]) / (len(t[0]) - 1) for rid, t in tokens.items() if len(t[0]) > 1]
    fractions = [s["used_bytes"] / s["mapped_bytes"] for s in samples if s["mapped_bytes"] > 0]
    held = [s["used_bytes"] / s["held_bytes"] for s in samples if s["held_bytes"] > 0]
    metrics = {
        "requests": len(wl.requests), "steps": steps, "output_tokens": n_out, "prompt_tokens": n_in,
        "elapsed_s": clock, "requests_per_s": len(wl.requests) / clock, "output_tokens_per_s": n_out / clock,
        "total_tokens_per_s": (n_in + n_out) / clock,
        "mean_ttft_s": statistics.mean(ttft), "median_ttft_s": statistics.median(ttft),
        "mean_tpot_s": statistics.mean(tpot) if tpot else None,
        "preemptions": engine.stats().num_preemptions - pre0,
        "peak_running": max(s["running"] for s in samples),
        "peak_mapped_bytes": max(s["mapped_bytes"] for s in samples),
        "mean_mapped_bytes": statistics.mean(s["mapped_bytes"] for s in samples),
        "peak_used_bytes": max(s["used_bytes"] for s in samples),
        "peak_held_bytes": max(s["held_bytes"] for s in samples),
        "mean_used_fraction_of_mapped": statistics.mean(fractions) if fractions else None,
        "mean_used_fraction_of_held": statistics.mean(held) if held else None,
        "map_seconds": st.map_seconds - st0.map_seconds,
        "map_wait_seconds": st.map_wait_seconds - st0.map_wait_seconds,
        "unit_bytes": st.page_bytes, "tokens_per_unit": st.tokens_per_unit,
        "pool_bytes": st.units_total * st.page_bytes,
    }
    res = EngineResult(EngineSpec("?"), metrics, {rid: t[0] for rid, t in tokens.items()}, samples=samples)
    res.logprobs = logprobs  # type: ignore[attr-defined]
    return res


def run_vattn(spec: EngineSpec, wl: Workload, opts: RunOptions) -> EngineResult:
    """A fresh engine for `spec`; one short warm-up request (not counted), then the workload."""
    engine = LLMEngine(engine_config(spec, opts))
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    try:
        engine.add_request("warmup", None, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           prompt_token_ids=wl.requests[0].prompt_token_ids[:16])
        while engine.has_unfinished_requests():
            engine.step()
        reclaim = getattr(engine.kv, "reclaim_all", None)  # start from an empty cache (no public accessor)
        if reclaim is not None:
            reclaim()
        res = drive(engine, wl, opts, sync, spec.label)
        res.metrics["tensor_parallel_size"] = spec.tensor_parallel_size
        res.spec = spec
        res.metrics.update({"engine": spec.label, "kind": spec.kind, "attention_kernel": _kernel_name(engine),
                            "kv_layout": engine.config.kv_layout if engine.config.kv_cache == "vattention" else None,
                            "page_size": engine.config.page_size, "block_size":
                                spec.block_size if spec.kind == "paged" else None})
        return res
    finally:
        engine.close()


def run_hf(spec: EngineSpec, wl: Workload, opts: RunOptions) -> EngineResult:
    """transformers `generate` in static batches of `hf_batch_size` requests, in arrival order: left-padded prompts,
    the batch runs until its longest request is done (min_new_tokens = max_new_tokens, the ignore_eos of HF), and
    only each request's own max_tokens count as output."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from vattn.bench.models import read_config

    if wl.rate is not None:
        return EngineResult(spec, error="offline only (static batches have no arrivals)")
    cfg = read_config(opts.model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        opts.dtype, torch.bfloat16 if opts.device == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=dtype).to(opts.device).eval()
    pad = cfg.get("pad_token_id")
    pad = pad if pad is not None else 0
    bs = opts.hf_batch_size or opts.max_num_seqs
    sync = torch.cuda.synchronize if opts.device == "cuda" else (lambda: None)

    def generate(batch: list[BenchRequest]) -> list[list[int]]:
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[i, width - len(r.prompt_token_ids):] = 1
        new = max(r.max_tokens for r in batch)
        kw = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
        r0 = batch[0]
        if r0.beam_width:
            kw.update(num_beams=r0.beam_width, do_sample=False)
        elif r0.n > 1:
            kw.update(do_sample=True, temperature=1.0, top_k=0, num_return_sequences=r0.n)
        else:
            kw.update(do_sample=False)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(opts.device), attention_mask=mask.to(opts.device), **kw)
        step = 1 if r0.beam_width else r0.n
        return [out[i * step, width:width + r.max_tokens].tolist() for i, r in enumerate(batch)]

    generate(wl.requests[:1])  # warm-up, not counted
    tokens: dict[str, list[int]] = {}
    sync()
    t0 = time.perf_counter()
    with tqdm(total=len(wl.requests), desc=spec.label, disable=not opts.progress, leave=False) as bar:
        for i in range(0, len(wl.requests), bs):
            batch = wl.requests[i:i + bs]
            for r, t in zip(batch, generate(batch)):
                tokens[r.request_id] = t
            bar.update(len(batch))
    sync()
    elapsed = time.perf_counter() - t0
    n_out = sum(r.output_tokens for r in wl.requests)
    n_in = sum(len(r.prompt_token_ids) for r in wl.requests)
    return EngineResult(spec, {
        "engine": spec.label, "kind": "hf", "requests": len(wl.requests), "output_tokens": n_out,
        "prompt_tokens": n_in, "elapsed_s": elapsed, "requests_per_s": len(wl.requests) / elapsed,
        "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
        "batch_size": bs, "attention_kernel": getattr(model.config, "_attn_implementation", None)}, tokens)


def run_engine(spec: EngineSpec, wl: Workload, opts: RunOptions) -> EngineResult:
    """Run one engine; a failure becomes the row's error (and the comparison goes on), except for vattn's own
    paths, whose failures are bugs and raise."""
    if spec.kind in VATTN_KINDS:
        return run_vattn(spec, wl, opts)
    if spec.kind == "hf":
        try:
            return run_hf(spec, wl, opts)
        except Exception as exc:  # noqa: BLE001 - a peer's failure is its row's content
            return EngineResult(spec, error=f"transformers failed: {type(exc).__name__}: {exc}")
    from vattn.bench.peers import run_vllm_offline

    return run_vllm_offline(spec, wl, opts)
