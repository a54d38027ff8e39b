"""`vattn bench kernels`: attention alone, prefill and decode, over context lengths and batch sizes: the same
kernel on an allocator virtual tensor vs on a plain torch allocation, and contiguous vs paged kernels of one family.

    vattn bench kernels [--device cpu|cuda] [--batch 8] [--contexts 256,1024] [--heads 16] [--kv-heads 4]
                        [--head-dim 128] [--block-size 16]

Layouts hold the same K/V values: the contiguous caches are VirtualTensors ([S, L, Hk, D], pages mapped for the
rows used, 64 KiB host pages / 2 MiB CUDA pages) and, for the cost of virtual memory itself, plain torch tensors
of the same shape (`plain_*`: `virtual_over_plain` should be 1.0); the paged pools are [num_blocks, block_size,
Hk, D] with each sequence's blocks scattered at random (a fragmented pool, as after a while of serving). Each
variant is one of the engine's attention backends called through forward() (so each call also writes the step's
new K/V). Before timing, every variant's output is checked against the first one of its phase.
  cpu:  contiguous sdpa (SDPA on per-sequence views) vs paged torch (gather the blocks, then SDPA)
  cuda: + Triton paged kernel vs its contiguous twin (one kernel, only the addressing differs), torch's flash
        (contiguous), flash-attn contiguous and paged (block 256) when installed, torch paged gather.
Phases: decode (one query token per sequence, context ctx) and prefill (ctx query tokens, context ctx).
Ratios: paged time / contiguous time for the pairs that share a kernel family.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time

import torch

from vattn.attention import cpu_kernels
from vattn.attention.contiguous import ContiguousAttention, flash_attn_available, torch_flash_supported
from vattn.attention.metadata import AttentionMetadata
from vattn.attention.paged import PagedAttention
from vattn.bench import options
from vattn.bench.report import Report, command_line

PAIRS = [("paged_torch", "contiguous_sdpa"), ("paged_triton", "contiguous_triton"),
         ("paged_flash_attn", "contiguous_flash_attn")]


class Layouts:
    """One layer's K/V for `batch` sequences of `ctx` tokens, in both layouts, with identical values."""

    def __init__(self, batch: int, ctx: int, kv_heads: int, head_dim: int, block_size: int, dtype, device: str,
                 seed: int = 0, interleave_layers: int = 0):
        from allocator import PagePool, VirtualTensor, open_backend

        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(batch, ctx, kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(batch, ctx, kv_heads, head_dim, generator=g).to(dtype)
        self.backend = open_backend("cuda" if self.device.type == "cuda" else "host")
        row_bytes = ctx * kv_heads * head_dim * k.element_size()
        pages = -(-batch * row_bytes // self.backend.page_size)
        self.pool = PagePool(self.backend, pages * self.backend.page_size * 2)
        self.k_vt = VirtualTensor(self.pool, (batch, ctx, kv_heads, head_dim), dtype)
        self.v_vt = VirtualTensor(self.pool, (batch, ctx, kv_heads, head_dim), dtype)
        for vt, src in ((self.k_vt, k), (self.v_vt, v)):
            vt.map(0, pages)
            vt.tensor.copy_(src.to(self.device))
        # the same values in ordinary torch memory: the virtual tensor's only difference is how it was allocated
        self.k_plain, self.v_plain = k.to(self.device).clone(), v.to(self.device).clone()
        per_seq = -(-ctx // block_size)
        num_blocks = batch * per_seq
        order = list(range(num_blocks))
        random.Random(seed).shuffle(order)
        self.tables = [order[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_pool = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=dtype, device=self.device)
        for i, table in enumerate(self.tables):
            for j, b in enumerate(table):
                n = min(block_size, ctx - j * block_size)
                self.k_pool[b, :n] = k[i, j * block_size: j * block_size + n].to(self.device)
                self.v_pool[b, :n] = v[i, j * block_size: j * block_size + n].to(self.device)
        self.batch, self.ctx, self.block_size = batch, ctx, block_size
        # the interleaved vAttention layout [seq, token, layer, k|v, head, dim]: layer 0's K/V as strided views
        self.interleaved = None
        if interleave_layers:
            big = torch.zeros(batch, ctx, interleave_layers, 2, kv_heads, head_dim, dtype=dtype, device=self.device)
            big[:, :, 0, 0], big[:, :, 0, 1] = k.to(self.device), v.to(self.device)
            self.interleaved = (big[:, :, 0, 0], big[:, :, 0, 1])

    def close(self) -> None:
        self.k_vt.close()
        self.v_vt.close()
        self.pool.close()
        self.backend.close()


def variants(lay: Layouts, scale: float, dtype, head_dim: int) -> dict[str, object]:
    """name -> attention backend (forward(layer, q, k, v, meta))."""
    dev = lay.device
    contiguous = {"contiguous_sdpa": "sdpa"}
    paged = {"paged_torch": "torch"}
    if dev.type == "cpu" and cpu_kernels.available():  # our batched C++ twins, one family for both layouts
        contiguous["contiguous_cpu"] = "cpu"
        paged["paged_cpu"] = "cpu"
    if dev.type == "cuda":
        paged["paged_triton"] = "triton"
        contiguous["contiguous_triton"] = "triton"
        if torch_flash_supported(dev, dtype, head_dim):
            contiguous["contiguous_torch_flash"] = "torch_flash"
            if flash_attn_available():
                contiguous["contiguous_flash_attn"] = "flash_attn"
    out = {name: ContiguousAttention([lay.k_vt.tensor], [lay.v_vt.tensor], scale, kernel=k)
           for name, k in contiguous.items()}
    out.update({name.replace("contiguous", "plain"): ContiguousAttention([lay.k_plain], [lay.v_plain], scale, kernel=k)
                for name, k in contiguous.items()})
    out.update({name: PagedAttention([lay.k_pool], [lay.v_pool], scale, lay.block_size, kernel=k)
                for name, k in paged.items()})
    if lay.interleaved is not None:
        ki, vi = lay.interleaved
        out.update({name.replace("contiguous", "interleaved"): ContiguousAttention([ki], [vi], scale, kernel=k)
                    for name, k in contiguous.items()})
    return out


def metadata(name: str, lay: Layouts, qlen: int) -> AttentionMetadata:
    q, c = [qlen] * lay.batch, [lay.ctx] * lay.batch
    if not name.startswith("paged"):
        return AttentionMetadata.build_contiguous(q, c, list(range(lay.batch)), lay.device)
    return AttentionMetadata.build_paged(q, c, lay.tables, lay.block_size, lay.device)


def bench_phase(lay: Layouts, phase: str, heads: int, head_dim: int, dtype, repeats: int, warmup: int,
                extra: dict[str, object]) -> list[dict]:
    dev = lay.device
    qlen = 1 if phase == "decode" else lay.ctx
    g = torch.Generator().manual_seed(1)
    T = qlen * lay.batch
    q = torch.randn(T, heads, head_dim, generator=g).to(dtype).to(dev)
    # the step's own K/V: rewrite the values already there, so repeated calls leave the caches unchanged
    kv_heads = lay.k_pool.shape[2]
    pos = torch.arange(lay.ctx - qlen, lay.ctx)
    k_new = lay.k_vt.tensor[:, pos.to(dev)].reshape(T, kv_heads, head_dim).clone()
    v_new = lay.v_vt.tensor[:, pos.to(dev)].reshape(T, kv_heads, head_dim).clone()
    scale = head_dim ** -0.5
    backends = variants(lay, scale, dtype, head_dim)
    backends.update(extra)
    metas = {name: metadata(name, lay, qlen) for name in backends}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ref_name, ref = None, None
    calls = {}
    for name, b in backends.items():
        calls[name] = (lambda b=b, m=metas[name]: b.forward(0, q, k_new, v_new, m))
        out = calls[name]()
        if ref is None:
            ref_name, ref = name, out.float()
        else:
            err = (out.float() - ref).abs().max().item()
            tol = 1e-3 if dtype == torch.float32 else 3e-2
            if not math.isfinite(err) or err > tol:
                raise AssertionError(f"{phase}: {name} differs from {ref_name} by {err:.3g} (tolerance {tol})")
    for _ in range(warmup):
        for c in calls.values():
            c()
    times = {name: [] for name in calls}
    for _ in range(repeats):  # round-robin: load drift on a shared machine hits every variant alike
        for name, c in calls.items():
            sync()
            t0 = time.perf_counter()
            c()
            sync()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        rows.append({"phase": phase, "variant": name, "layout": name.split("_")[0], "batch": lay.batch,
                     "memory": "plain" if name.startswith("plain") else "pool" if name.startswith("paged") else "virtual",
                     "ctx": lay.ctx, "query_tokens": T, "median_us": statistics.median(ts) * 1e6,
                     "min_us": min(ts) * 1e6})
    by = {r["variant"]: r for r in rows}
    for p, c in PAIRS:
        if p in by and c in by:
            by[p]["paged_over_contiguous"] = by[p]["median_us"] / by[c]["median_us"]
    for name, r in by.items():
        twin = name.replace("interleaved", "contiguous")
        if name.startswith("interleaved") and twin in by:
            r["interleaved_over_contiguous"] = r["median_us"] / by[twin]["median_us"]
        plain = name.replace("contiguous", "plain")
        if name.startswith("contiguous") and plain in by:
            r["virtual_over_plain"] = r["median_us"] / by[plain]["median_us"]
    fastest_contig = min((r["median_us"] for r in rows if r["layout"] == "contiguous"), default=None)
    for r in rows:
        r["vs_fastest_contiguous"] = r["median_us"] / fastest_contig if fastest_contig else None
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[2:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="vattn bench kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--batch", default="8", help="decode batch sizes, comma-separated")
    ap.add_argument("--contexts", default="256,1024", help="context lengths, comma-separated")
    ap.add_argument("--prefill-batch", default="2", help="prefill batch sizes, comma-separated")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--phases", default="decode,prefill")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one kernel, one core)")
    ap.add_argument("--interleave-layers", type=int, default=8,
                    help="also time the interleaved vAttention layout [seq, token, layer, k|v, head, dim] with this "
                         "many layers (0: skip); its per-layer views have a token stride of 2*layers*heads*dim")
    options.add_output_args(ap)
    args = ap.parse_args(argv)
    device = options.resolve_device(args.device)
    torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)

    def ints(text: str, flag: str) -> list[int]:
        try:
            vals = [int(c) for c in text.split(",") if c.strip()]
        except ValueError:
            vals = []
        if not vals or min(vals) < 1:
            raise ValueError(f"{flag} must be positive integers, got {text!r}")
        return vals

    contexts, batches, prefill_batches = (ints(args.contexts, "--contexts"), ints(args.batch, "--batch"),
                                          ints(args.prefill_batch, "--prefill-batch"))
    phases = [p for p in args.phases.split(",") if p.strip()]
    options.positive(args, "heads", "kv_heads", "head_dim", "block_size", "repeats")
    if set(phases) - {"decode", "prefill"} or not phases:
        raise ValueError(f"--phases must be a subset of decode,prefill, got {args.phases!r}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    report = Report("kernels", device, command_line(["kernels", *argv]), options.out_path(args, device, "kernels"),
                    {"model": f"attention only: {args.heads} heads, {args.kv_heads} KV heads, head_dim {args.head_dim}",
                     "dtype": str(dtype).removeprefix("torch."), "heads": args.heads, "kv_heads": args.kv_heads,
                     "head_dim": args.head_dim, "block_size": args.block_size,
                     "flash_attn_installed": flash_attn_available(),
                     "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"})
    rows = []
    for phase in phases:
        for batch in (batches if phase == "decode" else prefill_batches):
            for ctx in contexts:
                lay = Layouts(batch, ctx, args.kv_heads, args.head_dim, args.block_size, dtype, device,
                              interleave_layers=args.interleave_layers)
                extra = {}
                fa = None
                try:
                    if device == "cuda" and flash_attn_available() and torch_flash_supported(lay.device, dtype,
                                                                                             args.head_dim):
                        fa = Layouts(batch, ctx, args.kv_heads, args.head_dim, 256, dtype, device)
                        extra["paged_flash_attn"] = _FAPaged(fa, args.head_dim ** -0.5)
                    rows += bench_phase(lay, phase, args.heads, args.head_dim, dtype, args.repeats, args.warmup,
                                        extra)
                finally:
                    lay.close()
                    if fa is not None:
                        fa.close()
    cols = [("phase", "s"), ("batch", "d"), ("ctx", "d"), ("variant", "s"), ("median_us", ".1f"),
            ("min_us", ".1f"), ("virtual_over_plain", ".3f"), ("paged_over_contiguous", ".3f"),
            ("interleaved_over_contiguous", ".3f"), ("vs_fastest_contiguous", ".3f")]
    notes = [f"dtype {report.header['dtype']}, heads {args.heads}, kv heads {args.kv_heads}, head_dim "
             f"{args.head_dim}, block size {args.block_size} (flash-attn paged: 256); one layer; {args.repeats} "
             f"round-robin repeats; interleaved layout with {args.interleave_layers} layers",
             "virtual_over_plain = the same kernel on an allocator VirtualTensor / on a plain torch tensor (1.0: "
             "virtual memory costs nothing); paged_over_contiguous = paged / contiguous time, same kernel family "
             "(>1: contiguous faster); interleaved_over_contiguous likewise for the interleaved layout's views"]
    payload = report.finish(rows, cols, notes)
    if not args.no_plot:
        from vattn.bench.plots import bars_plot

        bars_plot(report.plot_path(), [f"{r['phase']} b{r['batch']} ctx{r['ctx']} {r['variant']}" for r in rows],
                  [r["median_us"] for r in rows], "median µs per call (one layer)",
                  f"attention kernels, {report.header['dtype']}, {args.heads}/{args.kv_heads} heads, "
                  f"head_dim {args.head_dim}")
    return payload


class _FAPaged:
    """flash-attn's paged kernel over its own 256-token-block pools (flash-attn requires that block size)."""

    def __init__(self, lay: Layouts, scale: float):
        self.lay = lay
        self.attn = PagedAttention([lay.k_pool], [lay.v_pool], scale, lay.block_size, kernel="flash_attn")

        self.metas: dict[tuple, AttentionMetadata] = {}

    def forward(self, layer, q, k, v, meta):
        key = (tuple(meta.query_lens), tuple(meta.context_lens))
        if key not in self.metas:  # built on the first (checked, untimed) call
            self.metas[key] = AttentionMetadata.build_paged(meta.query_lens, meta.context_lens, self.lay.tables,
                                                            self.lay.block_size, self.lay.device)
        return self.attn.forward(layer, q, k, v, self.metas[key])

