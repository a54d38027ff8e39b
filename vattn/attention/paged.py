"""Attention over a paged KV cache: per layer one K and one V pool [num_blocks, block_size, Hk, D].

A sequence's tokens live in the blocks its block table lists, in order; token p sits in block table[p // bs] at
offset p % bs. Each step first writes its K/V at `slot_mapping` (flat index block * bs + offset), then attends.

Kernels (names and the choice of "auto" live in vattn.attention.kernels):
  cpu         the paged twin of our batched C++ kernel (vattn.attention.cpu_kernels): one call per layer per step,
              the K/V write fused in, rows found through the block table; the CPU default.
  torch       per sequence, gather only the blocks < ceil(ctx / bs) through the table, cut to ctx keys, then SDPA
              with a bottom-right causal mask and GQA (any device and dtype).
  triton      our Triton paged kernel (vattn.attention.triton_kernels), the GPU default; it has a twin over the
              contiguous layout so the two layouts can be compared on one kernel.
  flash_attn  flash-attn's paged path (block_table=...), which needs block_size a multiple of 256.
All kernels use the same convention: query j of sequence i sits at ctx - qlen + j and sees keys <= its position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vattn.attention.kernels import choose_kernel
from vattn.attention.metadata import AttentionMetadata


class PagedAttention:
    """Writes a step's K/V into the block pools, then attends each sequence's queries over its blocks."""

    def __init__(self, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor], scale: float, block_size: int,
                 kernel: str = "auto"):
        if len(k_pools) != len(v_pools) or not k_pools:
            raise ValueError(f"k_pools ({len(k_pools)}) and v_pools ({len(v_pools)}) must be equal, non-empty lists")
        shape, ref = tuple(k_pools[0].shape), k_pools[0]
        if len(shape) != 4 or shape[1] != block_size:
            raise ValueError(f"k_pools must be [num_blocks, block_size={block_size}, num_kv_heads, head_dim], "
                             f"got {shape}")
        for i, (kp, vp) in enumerate(zip(k_pools, v_pools)):
            for name, p in (("k_pools", kp), ("v_pools", vp)):
                if tuple(p.shape) != shape or p.dtype != ref.dtype or p.device != ref.device or not p.is_contiguous():
                    raise ValueError(f"{name}[{i}] is {tuple(p.shape)} {p.dtype} {p.device}, expected a contiguous "
                                     f"{shape} {ref.dtype} {ref.device}")
        self.k_pools, self.v_pools, self.scale, self.block_size = k_pools, v_pools, float(scale), block_size
        self.num_blocks, _, self.num_kv_heads, self.head_dim = shape
        self.kernel = choose_kernel("paged", kernel, ref.device, ref.dtype, self.head_dim, block_size)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """pool.flat[slot_mapping[t]] = k[t], v[t]."""
        flat = (self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)
        self.k_pools[layer].view(flat).index_copy_(0, meta.slot_mapping, k)
        self.v_pools[layer].view(flat).index_copy_(0, meta.slot_mapping, v)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hk, D] for this step's tokens -> attention output [T, H, D]."""
        if meta.block_tables is None or meta.slot_mapping is None:
            raise ValueError("meta has no block_tables: build it with AttentionMetadata.build_paged")
        if k.shape[1:] != (self.num_kv_heads, self.head_dim) or v.shape != k.shape:
            raise ValueError(f"k/v are {tuple(k.shape)}/{tuple(v.shape)}, the pools expect "
                             f"[T, {self.num_kv_heads}, {self.head_dim}]")
        if q.shape[0] != meta.slot_mapping.numel() or k.shape[0] != q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} tokens, k {k.shape[0]}, slot_mapping {meta.slot_mapping.numel()}")
        kp, vp = self.k_pools[layer], self.v_pools[layer]
        if self.kernel == "cpu":  # writes k/v through the block table itself, then attends, in one call
            from vattn.attention.cpu_kernels import paged_attention
            return paged_attention(q, kp, vp, meta.block_tables, meta.context_lens_tensor, meta.cu_query_lens,
                                   self.scale, k_new=k, v_new=v)
        self.write_kv(layer, k, v, meta)
        if self.kernel == "triton":
            from vattn.attention.triton_kernels import paged_attention
            return paged_attention(q, kp, vp, meta.block_tables, meta.context_lens_tensor, meta.cu_query_lens,
                                   meta.max_query_len, self.scale)
        if self.kernel == "flash_attn":
            return self._flash_attn(q, kp, vp, meta)
        return self._torch(q, kp, vp, meta)

    def _torch(self, q, kp, vp, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        gqa = q.shape[1] != self.num_kv_heads
        bs, start = self.block_size, 0
        for i, (qlen, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
            blocks = meta.block_tables[i, : -(-ctx // bs)].long()  # never a block past ctx
            ks = kp[blocks].flatten(0, 1)[:ctx].transpose(0, 1)  # [Hk, ctx, D]
            vs = vp[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
            qs = q[start: start + qlen].transpose(0, 1)  # [H, qlen, D]
            mask = None
            if qlen > 1:  # query j sits at ctx - qlen + j
                qpos = torch.arange(ctx - qlen, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            out[start: start + qlen] = o.transpose(0, 1)
            start += qlen
        return out

    def _flash_attn(self, q, kp, vp, meta: AttentionMetadata) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        if meta.is_decode_only:
            out = flash_attn_with_kvcache(q.unsqueeze(1), kp, vp, cache_seqlens=meta.context_lens_tensor,
                                          block_table=meta.block_tables, softmax_scale=self.scale, causal=True)
            return out.squeeze(1)
        return flash_attn_varlen_func(q, kp, vp, meta.cu_query_lens, meta.cu_context_lens, meta.max_query_len,
                                      meta.max_context_len, softmax_scale=self.scale, causal=True,
                                      block_table=meta.block_tables)
