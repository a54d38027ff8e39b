"""The flags the modes share: model, workload, engine sizes, threads and output."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from vattn.bench.workloads import KINDS
from vattn.cli import parse_size


def add_model_args(ap: argparse.ArgumentParser, default_model: str = "llama-4l-h128") -> None:
    g = ap.add_argument_group("model and machine")
    g.add_argument("--model", default=default_model,
                   help="a local Hugging Face model directory, 'default' (the bundled model) or a random preset: "
                        "llama-4l-h128, llama-8l-h512, tiny, small, llama3-8b-4l (default: %(default)s)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="(default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on CPU, bfloat16 on GPU")
    g.add_argument("--threads", type=int, default=None,
                   help="cores each engine computes on: torch intra-op threads for vattn and transformers, and for "
                        "N >= 2 vLLM's compute threads bound to N cores; with 1, vLLM keeps its default binding (all "
                        "cores but one, kept for its scheduler process), recorded in its row (default: every CPU)")


def add_workload_args(ap: argparse.ArgumentParser, default: str = "fixed", num_requests: int = 128,
                      input_len: int | None = 128, output_len: int | None = 128) -> None:
    g = ap.add_argument_group("workload (seeded; see vattn/bench/workloads.py)")
    g.add_argument("--workload", "--dist", dest="workload", default=default, choices=KINDS,
                   help="(default: %(default)s)")
    g.add_argument("--num-requests", type=int, default=num_requests, help="(default: %(default)s)")
    g.add_argument("--input-len", type=int, default=input_len, help="fixed: prompt tokens; long-context: the longest")
    g.add_argument("--output-len", type=int, default=output_len,
                   help="fixed: output tokens; other kinds: override the drawn output lengths")
    g.add_argument("--prefix-len", type=int, default=None, help="shared-prefix: tokens of the common prefix")
    g.add_argument("--n", type=int, default=4, help="parallel: samples per request (default: %(default)s)")
    g.add_argument("--beam-width", type=int, default=4, help="beam: width (default: %(default)s)")
    g.add_argument("--scale", type=float, default=1.0, help="multiply drawn lengths by this, in (0, 1]")
    g.add_argument("--seed", type=int, default=0)


def add_engine_args(ap: argparse.ArgumentParser, kv_memory: str = "1G", max_num_seqs: int = 128) -> None:
    g = ap.add_argument_group("engines (the same for every vattn path; vLLM gets the same sizes)")
    g.add_argument("--page-sizes", default=None,
                   help="vAttention page sizes, comma-separated (default: 64K on CPU, 2M on GPU)")
    g.add_argument("--kv-layouts", default="per_layer", help="vAttention layouts: per_layer and/or interleaved")
    g.add_argument("--block-sizes", "--block-size", dest="block_sizes", default="16",
                   help="paged block sizes in tokens, comma-separated (default: %(default)s)")
    g.add_argument("--kv-memory", default=kv_memory, type=parse_size,
                   help="physical KV pool per vattn path (vLLM: rounded up to whole GiB) (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=max_num_seqs, help="(default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=4096, help="(default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None, help="default: the workload's longest request")
    g.add_argument("--preemption-mode", default=None, choices=["recompute", "swap"])
    g.add_argument("--attention-kernel", "--contiguous-kernel", dest="attention_kernel", default="auto",
                   help="vAttention kernel: auto, sdpa, torch_flash, flash_attn or triton")
    g.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                   help="prefix caching on every engine that has it (default: off)")


def add_output_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("output")
    g.add_argument("--json", "--out", dest="out", default=None,
                   help="JSON path; .md, .txt and .png go beside it (default: benchmarks/results/<machine>/<name>.json)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    return name


def set_threads(threads: int | None) -> int:
    n = threads or os.cpu_count() or 1
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(n)
    return n


def split_sizes(text: str | None, default: str, flag: str) -> list[int]:
    sizes = [parse_size(s) for s in (text or default).split(",") if s.strip()]
    if not sizes:
        raise ValueError(f"{flag}: give at least one size")
    return sizes


def out_path(args, device: str, name: str) -> Path:
    from vattn.bench.report import results_dir

    return Path(args.out) if args.out else results_dir(device) / f"{name}.json"


def positive(args, *names: str) -> None:
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
