"""Our Triton attention kernel, in two twins: over a paged KV pool and over the contiguous (vAttention) layout.

Both twins are one jitted function specialised on the constexpr PAGED, so a GPU comparison between them measures
the layout and nothing else. The only difference is where key `n` of sequence `b` lives:

    paged       row = block_table[b, n // PAGE], position in row = n % PAGE   (pool [num_blocks, PAGE, Hk, D])
    contiguous  row = slot[b],                   position in row = n          (cache [max_num_seqs, L, Hk, D])

One program computes BLOCK_M query tokens of one sequence for one query head, streaming keys in tiles of BLOCK_N
with an online softmax (fp32 accumulators). Query j of a sequence sits at position ctx - qlen + j and sees keys at
positions <= its own (bottom-right causal), so the same kernel serves prefill, chunked prefill and decode. Loads are
masked to positions < ctx: no key past a sequence's length is ever touched, which matters on the contiguous layout
where those addresses may be unmapped.

Both dots ask for input_precision="ieee": for fp32 inputs Triton's default on NVIDIA is TF32 (10-bit mantissa),
which would make the fp32 path disagree with the reference; bf16/fp16 inputs are unaffected.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_kernel(
    Q, K, V, OUT, ROWS, CTX, CU_Q,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kr, stride_kp, stride_kh, stride_vr, stride_vp, stride_vh,
    stride_rows, row_base, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx = tl.load(CTX + b)
    kv_h = h // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = ctx - q_len + offs_m
    # the last query of this tile sees keys [0, its position]; never past ctx
    end = tl.minimum(ctx, ctx - q_len + (m_block + 1) * BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        if PAGED:  # the only line that differs between the twins: where key n lives
            row = tl.load(ROWS + b * stride_rows + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            pos = (offs_n % PAGE).to(tl.int64)
        else:
            row = tl.load(ROWS + b).to(tl.int64) - row_base + tl.zeros([BLOCK_N], tl.int64)
            pos = offs_n.to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + row[:, None] * stride_kr + pos[:, None] * stride_kp + kv_h * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + row[:, None] * stride_vr + pos[:, None] * stride_vp + kv_h * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


def _check(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cu_query_lens: torch.Tensor, context_lens: torch.Tensor):
    if q.dim() != 3 or kc.dim() != 4 or vc.shape != kc.shape:
        raise ValueError(f"q must be [T, H, D] and caches 4-d and equal: q {tuple(q.shape)}, k {tuple(kc.shape)}, "
                         f"v {tuple(vc.shape)}")
    if q.shape[2] != kc.shape[3]:
        raise ValueError(f"head_dim differs: q has {q.shape[2]}, cache has {kc.shape[3]}")
    if q.shape[1] % kc.shape[2]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({kc.shape[2]})")
    if q.stride(2) != 1 or kc.stride(3) != 1 or vc.stride(3) != 1:
        raise ValueError("the head_dim axis of q and of the caches must be contiguous")
    if cu_query_lens.numel() != context_lens.numel() + 1:
        raise ValueError(f"cu_query_lens has {cu_query_lens.numel()} entries, expected len(context_lens) + 1")


def _launch(q, kc, vc, rows, stride_rows, row_base, context_lens, cu_query_lens, max_query_len, scale, page, paged,
            block_m, block_n, out):
    _check(q, kc, vc, cu_query_lens, context_lens)
    T, H, D = q.shape
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last axis, got {tuple(out.shape)}")
    B = context_lens.numel()
    if block_m is None:
        block_m = 16 if max_query_len <= 16 else 64
    grid = (B, H, triton.cdiv(max_query_len, block_m))
    _attention_kernel[grid](
        q, kc, vc, out, rows, context_lens, cu_query_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        stride_rows, row_base, float(scale),
        GROUP=H // kc.shape[2], HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page, PAGED=paged,
    )
    return out


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_query_lens: torch.Tensor, max_query_len: int, scale: float,
                    out: torch.Tensor | None = None, block_m: int | None = None, block_n: int = 32) -> torch.Tensor:
    """q [T, H, D] (sequence b's tokens at cu_query_lens[b]:cu_query_lens[b+1]) over pools [N, PAGE, Hk, D]."""
    if block_tables.dim() != 2 or block_tables.shape[0] != context_lens.numel():
        raise ValueError(f"block_tables must be [B, max_blocks] with B = {context_lens.numel()}, "
                         f"got {tuple(block_tables.shape)}")
    return _launch(q, k_pool, v_pool, block_tables, block_tables.stride(0), 0, context_lens, cu_query_lens,
                   max_query_len, scale, k_pool.shape[1], True, block_m, block_n, out)


def contiguous_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         context_lens: torch.Tensor, cu_query_lens: torch.Tensor, max_query_len: int, scale: float,
                         out: torch.Tensor | None = None, block_m: int | None = None,
                         block_n: int = 32, base_slot: int | None = None) -> torch.Tensor:
    """The twin: q [T, H, D] over caches [max_num_seqs, L, Hk, D], sequence b in row slots[b].

    The kernel is handed the caches from row `base_slot` on (default: the lowest of `slots`, read with a sync), so
    that every pointer it receives is mapped memory: a virtual cache's row 0 may be unmapped, and Triton's launcher
    refuses pointers into unmapped pages. base_slot must be <= every slot and belong to a sequence with ctx >= 1.
    """
    if slots.numel() != context_lens.numel():
        raise ValueError(f"slots has {slots.numel()} entries, context_lens has {context_lens.numel()}")
    if base_slot is None:
        base_slot = int(slots.min()) if slots.numel() else 0
    if not 0 <= base_slot < max(k_cache.shape[0], 1):
        raise ValueError(f"base_slot {base_slot} out of range for a cache of {k_cache.shape[0]} rows")
    return _launch(q, k_cache[base_slot:], v_cache[base_slot:], slots, 0, base_slot, context_lens, cu_query_lens,
                   max_query_len, scale, 1, False, block_m, block_n, out)
