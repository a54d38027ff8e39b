"""Attention over the virtually contiguous KV cache: per layer one K and one V tensor [S, L, Hk, D].

Row `slot` of a cache holds one sequence; only positions [0, context_len) of the rows of the sequences
in the batch are guaranteed mapped. Every kernel here writes and reads exactly those positions: touching
anything else may hit an unmapped page and kill the process.

Kernels (names and the choice of "auto" live in vattn.attention.kernels):
  cpu         our batched C++ kernel (vattn.attention.cpu_kernels): one call per layer per step for the whole
              batch, the K/V write fused in, multi-threaded over sequences x kv heads x query tiles, walking each
              row only up to its context length; takes the caches' strides, so the interleaved layout works.
              The CPU default.
  sdpa        per-sequence views cache[slot, :ctx] -> F.scaled_dot_product_attention (any device/dtype).
  torch_flash torch's own FlashAttention-2 (aten._flash_attention_forward, varlen) over the cache viewed
              as [S*L, Hk, D]: sequence i's keys start at cum_seq_k[i] = slot*L and seqused_k[i] = ctx of
              them are read, so no copy and no padding reads. Needs CUDA sm80+, fp16/bf16.
  flash_attn  the flash-attn package. Decode-only steps: flash_attn_with_kvcache(cache_batch_idx=slots,
              cache_seqlens=ctx), the split-KV decode kernel vAttention uses. Steps with a prefill:
              flash_attn_varlen_func's python API has no seqused_k, so we pass the cache as a paged cache
              whose block is a whole row (block_table[i] = [slot], page size L, which flash-attn requires
              to be a multiple of 256); the kernel then reads rows [slot, :ctx] in place. If L is not a
              multiple of 256 such steps go to torch_flash.
  triton      our Triton kernel's contiguous twin (vattn.attention.triton_kernels.contiguous_attention), the
              same kernel family as the paged path's default GPU kernel, so the two layouts compare on one kernel.
              Needs CUDA, or TRITON_INTERPRET=1 on CPU (slow: tests only). It is handed caches that start at the
              lowest slot of the batch, whose first page is mapped (Triton's launcher refuses unmapped pointers).
All kernels use bottom-right causal alignment: query j of sequence i sits at ctx - qlen + j and sees keys
at positions <= its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vattn.attention.kernels import choose_kernel, flash_attn_available, torch_flash_supported
from vattn.attention.metadata import AttentionMetadata

__all__ = ["ContiguousAttention", "flash_attn_available", "torch_flash_supported"]


class ContiguousAttention:
    """Writes a step's K/V into the per-layer caches in place, then attends over cache[slot, :ctx]."""

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], scale: float, kernel: str = "auto"):
        if len(k_caches) != len(v_caches) or not k_caches:
            raise ValueError(f"k_caches ({len(k_caches)}) and v_caches ({len(v_caches)}) must be equal, non-empty lists")
        shape, ref = tuple(k_caches[0].shape), k_caches[0]
        if len(shape) != 4:
            raise ValueError(f"k_caches must be [max_num_seqs, max_model_len, num_kv_heads, head_dim], got {shape}")
        for i, (kc, vc) in enumerate(zip(k_caches, v_caches)):
            for name, c in (("k_caches", kc), ("v_caches", vc)):
                if tuple(c.shape) != shape or c.dtype != ref.dtype or c.device != ref.device:
                    raise ValueError(f"{name}[{i}] is {tuple(c.shape)} {c.dtype} {c.device}, expected {shape} {ref.dtype} {ref.device}")
        self.k_caches, self.v_caches, self.scale = k_caches, v_caches, float(scale)
        self.max_num_seqs, self.max_model_len, self.num_kv_heads, self.head_dim = shape
        self.kernel = choose_kernel("vattention", kernel, ref.device, ref.dtype, self.head_dim)
        if self.kernel not in ("sdpa", "cpu") and self.max_num_seqs * self.max_model_len >= 2**31:
            raise ValueError(f"max_num_seqs * max_model_len = {self.max_num_seqs * self.max_model_len} overflows int32 offsets")

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """cache[token_slots[t], token_positions[t]] = k[t], v[t] (index_put, no copy of the cache)."""
        idx = (meta.token_slots, meta.token_positions)
        self.k_caches[layer].index_put_(idx, k)
        self.v_caches[layer].index_put_(idx, v)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hk, D] for this step's tokens -> attention output [T, H, D]."""
        if meta.token_slots is None or meta.slots is None:
            raise ValueError("meta has no slots: build it with AttentionMetadata.build_contiguous")
        if k.shape[1:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"k is {tuple(k.shape)}, cache expects [T, {self.num_kv_heads}, {self.head_dim}]")
        if max(meta.slots) >= self.max_num_seqs:
            raise ValueError(f"slots {meta.slots} out of range for a cache of max_num_seqs {self.max_num_seqs}")
        if meta.max_context_len > self.max_model_len:
            raise ValueError(f"max_context_len {meta.max_context_len} exceeds the cache's max_model_len {self.max_model_len}")
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        if self.kernel == "cpu":  # writes k/v itself, then attends, in one call
            from vattn.attention.cpu_kernels import contiguous_attention
            return contiguous_attention(q, kc, vc, meta.slots_tensor, meta.context_lens_tensor, meta.cu_query_lens,
                                        self.scale, k_new=k, v_new=v)
        self.write_kv(layer, k, v, meta)
        if self.kernel == "triton":
            from vattn.attention.triton_kernels import contiguous_attention
            return contiguous_attention(q, kc, vc, meta.slots_tensor, meta.context_lens_tensor, meta.cu_query_lens,
                                        meta.max_query_len, self.scale, base_slot=min(meta.slots))
        if self.kernel == "flash_attn":
            return self._flash_attn(q, kc, vc, meta)
        if self.kernel == "torch_flash":
            return self._torch_flash(q, kc, vc, meta)
        return self._sdpa(q, kc, vc, meta)

    def _sdpa(self, q, kc, vc, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        gqa = q.shape[1] != self.num_kv_heads
        start = 0
        for slot, qlen, ctx in zip(meta.slots, meta.query_lens, meta.context_lens):
            qs = q[start : start + qlen].transpose(0, 1)  # [H, qlen, D]
            ks = kc[slot, :ctx].transpose(0, 1)  # [Hk, ctx, D]: a view of mapped memory only
            vs = vc[slot, :ctx].transpose(0, 1)
            mask, causal = None, False
            if qlen == ctx:
                causal = qlen > 1
            elif qlen > 1:  # a later chunk: query j sits at ctx - qlen + j
                qpos = torch.arange(ctx - qlen, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=gqa)
            out[start : start + qlen] = o.transpose(0, 1)
            start += qlen
        return out

    def _flat_kv(self, kc, vc):
        """[S, L, Hk, D] -> [S*L, Hk, D] without a copy; the token stride may exceed Hk*D (interleaved layout)."""
        rows = self.max_num_seqs * self.max_model_len
        flat = []
        for c in (kc, vc):
            tok, head = c.stride(1), c.stride(2)
            if c.stride(0) != self.max_model_len * tok or c.stride(3) != 1:
                raise ValueError("torch_flash needs uniformly strided caches to view them as [S*L, Hk, D]")
            flat.append(c.as_strided((rows, self.num_kv_heads, self.head_dim), (tok, head, 1)))
        return flat

    def _torch_flash(self, q, kc, vc, meta: AttentionMetadata) -> torch.Tensor:
        kf, vf = self._flat_kv(kc, vc)
        # cum_seq_k[i] = slot_i * L is where sequence i's keys start; with seqused_k the kernel reads only
        # ctx_i keys from there and never uses cum_seq_k[i+1] - cum_seq_k[i], so unsorted slots are fine.
        # The last entry is only a shape requirement (B+1).
        cum_k = torch.empty(meta.num_seqs + 1, dtype=torch.int32, device=q.device)
        cum_k[:-1] = meta.slots_tensor * self.max_model_len
        cum_k[-1] = self.max_num_seqs * self.max_model_len
        out = torch.ops.aten._flash_attention_forward(
            q, kf, vf, meta.cu_query_lens, cum_k, meta.max_query_len, meta.max_context_len,
            0.0, True, False, scale=self.scale, seqused_k=meta.context_lens_tensor,
        )[0]
        return out

    def _flash_attn(self, q, kc, vc, meta: AttentionMetadata) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        if meta.is_decode_only:
            out = flash_attn_with_kvcache(
                q.unsqueeze(1), kc, vc,
                cache_seqlens=meta.context_lens_tensor, cache_batch_idx=meta.slots_tensor,
                softmax_scale=self.scale, causal=True,
            )
            return out.squeeze(1)
        if self.max_model_len % 256:
            return self._torch_flash(q, kc, vc, meta)
        return flash_attn_varlen_func(
            q, kc, vc, meta.cu_query_lens, meta.cu_context_lens, meta.max_query_len, meta.max_context_len,
            softmax_scale=self.scale, causal=True, block_table=meta.slots_tensor[:, None].contiguous(),
        )
