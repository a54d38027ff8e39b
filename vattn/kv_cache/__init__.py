"""KV cache managers: `vattention` (virtually contiguous rows, pages mapped on demand) and `paged` (block tables)."""

from __future__ import annotations

import torch

from vattn.kv_cache.base import KVCacheManager, KVStats


def create_kv_cache(kind: str, *, spec, dtype: torch.dtype, device: torch.device, max_num_seqs: int,
                    max_model_len: int, memory_bytes: int, page_size: int | None, block_size: int,
                    background_mapping: bool, enable_prefix_caching: bool,
                    attention_kernel: str = "auto", kv_layout: str = "per_layer") -> KVCacheManager:
    """`kind` "vattention" or "paged"; `spec` gives the layer count and this device's kv heads and head size."""
    common = dict(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=dtype,
                  device=device, max_num_seqs=max_num_seqs, max_model_len=max_model_len, memory_bytes=memory_bytes,
                  enable_prefix_caching=enable_prefix_caching, attention_kernel=attention_kernel)
    if kind == "vattention":
        from vattn.kv_cache.vattention import VAttentionKVCache
        return VAttentionKVCache(**common, page_size=page_size, background_mapping=background_mapping,
                                 layout=kv_layout)
    if kind == "paged":
        from vattn.kv_cache.paged import PagedKVCache
        return PagedKVCache(**common, block_size=block_size)
    raise ValueError(f"unknown kv_cache {kind!r}: expected 'vattention' or 'paged'")


__all__ = ["KVCacheManager", "KVStats", "create_kv_cache"]
