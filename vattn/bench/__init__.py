"""`vattn bench`: the comparative benchmark harness (also `python -m vattn.bench`).

Modes (one command each; `vattn bench <mode> --help` lists the flags):
  throughput  offline: the same requests through vattn's paths (vattention, paged, static), transformers and vLLM
  serve       online load (Poisson rates or fixed concurrency, streaming) against any OpenAI-compatible server, or
              servers it launches itself (--launch vattn,vllm)
  memory      KV memory: live-token share of mapped bytes, peak sequences, preemptions, savings from sharing
  kernels     attention alone: virtual vs plain memory, contiguous vs paged
  roofline    decode step time against the memory-bandwidth bound
  allocator   map / unmap latency of the allocator backends
`vattn bench --setup-peers` builds .venv-peers with vLLM (the same as `make peers`).
Results: a table on stdout, JSON + Markdown + text (+ PNG plots) under benchmarks/results/<machine>/.
"""

from vattn.bench.cli import main

__all__ = ["main"]
