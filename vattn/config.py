"""Engine configuration: one dataclass, validated once, shared by every layer below the API."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vattn.attention.kernels import KERNELS as ATTENTION_KERNELS

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"

KV_CACHE_KINDS = ("vattention", "paged")
PREEMPTION_MODES = ("recompute", "swap")
KV_LAYOUTS = ("per_layer", "interleaved")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EngineConfig:
    model: str = str(DEFAULT_MODEL_DIR)
    kv_cache: str = "vattention"  # "vattention" (virtually contiguous) or "paged" (block tables)
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU
    kv_cache_memory: int | None = None  # bytes of physical KV pool; None: 1 GiB on CPU, 85% of free GPU memory less 1 GiB
    page_size: int | None = None  # bytes per physical page; None: 64 KiB host, driver granularity on GPU
    kv_layout: str = "per_layer"  # vattention: "per_layer" K/V tensors, or "interleaved" (a page holds all layers)
    block_size: int = 16  # tokens per block on the paged path
    max_num_seqs: int = 16
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 4096
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    preemption_mode: str | None = None  # None: "swap" on GPU, "recompute" on CPU
    background_mapping: bool = True  # map next step's pages on a helper thread
    seed: int = 0
    # "auto", or one of the chosen path's kernels: vattention cpu|sdpa|torch_flash|flash_attn|triton, paged cpu|torch|triton|flash_attn
    attention_kernel: str = "auto"
    num_threads: int | None = None  # torch threads of the engine's process; None: torch's default (one per core)
    # ranks the model is split over (Megatron-style); rank 0 runs the engine and starts N-1 worker processes
    # (one GPU each on CUDA, at most one per core on CPU); kv_cache_memory is per rank
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}")
        if self.tensor_parallel_size > 1 and self.preemption_mode == "swap":
            raise ValueError("preemption_mode='swap' is not supported with tensor_parallel_size > 1 yet: "
                             "use 'recompute' (the default with tensor parallelism)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if self.kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_KINDS}, got {self.kv_cache!r}")
        if self.attention_kernel not in ATTENTION_KERNELS[self.kv_cache]:
            raise ValueError(f"attention_kernel for kv_cache={self.kv_cache!r} must be one of "
                             f"{ATTENTION_KERNELS[self.kv_cache]}, got {self.attention_kernel!r}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.preemption_mode is not None and self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not os.path.isdir(self.model):
            raise FileNotFoundError(f"model directory not found: {self.model}")
