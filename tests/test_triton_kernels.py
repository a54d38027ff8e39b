"""Our Triton attention twins (paged and contiguous) against a plain reference; on CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from vattn.attention.metadata import AttentionMetadata

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
if not CUDA and "triton" not in sys.modules:
    # Triton decides at decoration time, for its own library too, whether a kernel is interpreted: the variable
    # must be set before triton is first imported. Without a GPU no compiled Triton can run, so it stays set.
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreter_ready() -> bool:
    import triton.language.standard as std

    return type(std.sum).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def tk():
    """The kernel module: compiled on a GPU; on CPU reloaded under the interpreter (or skipped when triton was
    imported before this module set TRITON_INTERPRET; test_in_fresh_interpreter covers that case)."""
    name = "vattn.attention.triton_kernels"
    if CUDA:
        return importlib.import_module(name)
    if not _interpreter_ready():
        pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process; see test_in_fresh_interpreter")
    return importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)


@pytest.mark.skipif(CUDA, reason="the compiled kernels run in-process on a GPU")
def test_in_fresh_interpreter():
    """When this process cannot interpret (triton was imported first), run this module in a fresh one."""
    if _interpreter_ready():
        return  # the in-process tests below run under the interpreter
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                       cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-3000:]


def reference(q, k, v, qlens, ctxs, scale):
    """q [T, H, D]; k[i]/v[i] [ctx_i, Hk, D]: bottom-right causal attention per sequence, by hand."""
    outs, start = [], 0
    for qlen, ctx, ks, vs in zip(qlens, ctxs, k, v):
        qs = q[start: start + qlen].float()
        g = qs.shape[1] // ks.shape[1]
        ks, vs = ks[:ctx].float().repeat_interleave(g, 1), vs[:ctx].float().repeat_interleave(g, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - qlen, ctx)[:, None]
        s = s.masked_fill(~visible.to(s.device), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", F.softmax(s, -1), vs))
        start += qlen
    return torch.cat(outs)


def ragged(qlens, ctxs):
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return cu, torch.tensor(ctxs, dtype=torch.int32, device=DEV)


CASES = [  # (query heads, kv heads, head_dim, block_size, query lens, context lens)
    (4, 2, 24, 5, [3, 1, 20, 1], [7, 13, 20, 40]),  # GQA, odd head_dim and block size, prefill+chunk+decode
    (2, 2, 16, 4, [1, 1, 1], [1, 4, 9]),  # decode only, MHA
    (4, 1, 32, 16, [17, 2], [17, 35]),  # a prefill longer than one query tile (BLOCK_M 16 / 64)
]


def paged_setup(hq, hk, d, bs, qlens, ctxs, dtype=torch.float32, num_blocks=40):
    torch.manual_seed(0)
    q = torch.randn(sum(qlens), hq, d, device=DEV, dtype=dtype)
    kp = torch.full((num_blocks, bs, hk, d), float("nan"), device=DEV, dtype=dtype)  # unwritten = poison
    vp = torch.full_like(kp, float("nan"))
    perm, tables, i = torch.randperm(num_blocks).tolist(), [], 0
    for c in ctxs:
        n = -(-c // bs)
        tables.append(perm[i: i + n])
        i += n
    ks, vs = [], []
    for t, c in zip(tables, ctxs):
        k, v = torch.randn(c, hk, d, device=DEV, dtype=dtype), torch.randn(c, hk, d, device=DEV, dtype=dtype)
        for p in range(c):
            kp[t[p // bs], p % bs], vp[t[p // bs], p % bs] = k[p], v[p]
        ks.append(k)
        vs.append(v)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEV)
    return q, kp, vp, bt, ks, vs


@pytest.mark.parametrize("case", CASES)
def test_paged_kernel_matches_reference(tk, case):
    hq, hk, d, bs, qlens, ctxs = case
    q, kp, vp, bt, ks, vs = paged_setup(hq, hk, d, bs, qlens, ctxs)
    cu, cl = ragged(qlens, ctxs)
    out = tk.paged_attention(q, kp, vp, bt, cl, cu, max(qlens), d ** -0.5)
    torch.testing.assert_close(out, reference(q, ks, vs, qlens, ctxs, d ** -0.5), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_contiguous_twin_matches_reference_and_paged(tk, case):
    hq, hk, d, bs, qlens, ctxs = case
    q, kp, vp, bt, ks, vs = paged_setup(hq, hk, d, bs, qlens, ctxs)
    L, S = max(ctxs) + 3, len(ctxs) + 2
    kc = torch.full((S, L, hk, d), float("nan"), device=DEV)  # positions >= ctx are poison
    vc = torch.full_like(kc, float("nan"))
    slots = torch.randperm(S)[: len(ctxs)].tolist()
    for s, c, k, v in zip(slots, ctxs, ks, vs):
        kc[s, :c], vc[s, :c] = k, v
    cu, cl = ragged(qlens, ctxs)
    slots_t = torch.tensor(slots, dtype=torch.int32, device=DEV)
    out = tk.contiguous_attention(q, kc, vc, slots_t, cl, cu, max(qlens), d ** -0.5)
    torch.testing.assert_close(out, reference(q, ks, vs, qlens, ctxs, d ** -0.5), atol=2e-5, rtol=1e-4)
    paged = tk.paged_attention(q, kp, vp, bt, cl, cu, max(qlens), d ** -0.5)
    torch.testing.assert_close(out, paged, atol=1e-6, rtol=1e-6)  # one kernel, two layouts


def test_backends_with_triton_kernel_match_their_defaults(tk):
    from vattn.attention.contiguous import ContiguousAttention
    from vattn.attention.paged import PagedAttention

    torch.manual_seed(1)
    hq, hk, d, bs = 4, 2, 16, 4
    qlens, ctxs = [5, 1], [9, 6]
    q, k, v = torch.randn(6, hq, d, device=DEV), torch.randn(6, hk, d, device=DEV), torch.randn(6, hk, d, device=DEV)
    pools = [torch.randn(8, bs, hk, d, device=DEV) for _ in range(2)]
    tables = [[3, 0, 5], [6, 1]]
    outs = []
    for kernel in ("torch", "triton"):
        attn = PagedAttention([pools[0].clone()], [pools[1].clone()], d ** -0.5, bs, kernel=kernel)
        outs.append(attn.forward(0, q, k, v, AttentionMetadata.build_paged(qlens, ctxs, tables, bs, DEV)))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)
    caches = [torch.randn(3, 12, hk, d, device=DEV) for _ in range(2)]
    meta = AttentionMetadata.build_contiguous(qlens, ctxs, [2, 0], DEV)
    ref = ContiguousAttention([caches[0].clone()], [caches[1].clone()], d ** -0.5, kernel="sdpa").forward(0, q, k, v, meta)
    tri = ContiguousAttention([caches[0].clone()], [caches[1].clone()], d ** -0.5, kernel="triton")
    assert tri.kernel == "triton"
    torch.testing.assert_close(tri.forward(0, q, k, v, meta), ref, atol=2e-5, rtol=1e-4)


def test_kernel_input_errors(tk):
    q = torch.zeros(2, 3, 16, device=DEV)
    pool = torch.zeros(4, 4, 2, 16, device=DEV)
    cu, cl = ragged([2], [2])
    bt = torch.zeros(1, 1, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        tk.paged_attention(q, pool, pool, bt, cl, cu, 2, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        tk.paged_attention(q[:, :2], pool, pool, bt[0], cl, cu, 2, 1.0)
    with pytest.raises(ValueError, match="slots"):
        tk.contiguous_attention(q[:, :2], pool, pool, torch.zeros(2, dtype=torch.int32), cl, cu, 2, 1.0)


_UNMAPPED_PROBE = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from allocator import PagePool, VirtualTensor, open_backend
    from vattn.attention import triton_kernels as tk
    page = 64 * 1024
    backend = open_backend("host", page_size=page)
    pool = PagePool(backend, 8 * page)
    hk, d, L = 2, 16, 1024  # 128 B a token: 512 tokens a page, 2 pages a row
    kv = [VirtualTensor(pool, (3, L, hk, d), torch.float32) for _ in range(2)]
    ctxs, slots = [512, 37], [2, 1]  # row 0 is unmapped: the kernel must be handed the caches from row 1 on
    for t in kv:
        for s in slots:
            t.map(s * 2, 1)  # only the first page of each used row: position 512 and on are unmapped
    torch.manual_seed(0)
    for t in kv:
        for s, c in zip(slots, ctxs):
            t.tensor[s, :c] = torch.randn(c, hk, d)
    qlens = [3, 1]
    q = torch.randn(4, 4, d)
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    out = tk.contiguous_attention(q, kv[0].tensor, kv[1].tensor, torch.tensor(slots, dtype=torch.int32),
                                  torch.tensor(ctxs, dtype=torch.int32), cu, 3, d ** -0.5)
    assert torch.isfinite(out).all()
    for i, (s, c, n) in enumerate(zip(slots, ctxs, qlens)):  # a plain reference on the mapped rows
        qs = q[[0, 3][i]: [3, 4][i]].transpose(0, 1)
        ks, vs = (t.tensor[s, :c].transpose(0, 1).repeat_interleave(2, 0) for t in kv)
        mask = torch.arange(c)[None, :] <= torch.arange(c - n, c)[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=d ** -0.5)
        torch.testing.assert_close(out[[0, 3][i]: [3, 4][i]], ref.transpose(0, 1), atol=2e-5, rtol=1e-4)
    print("ok")
""")


@pytest.mark.skipif(CUDA, reason="the host-backend probe runs the interpreter; the GPU tests cover the real kernel")
def test_contiguous_twin_never_touches_unmapped_pages():
    """Rows mapped exactly up to a page boundary at ctx: any read past ctx would SIGSEGV the child process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _UNMAPPED_PROBE], cwd=root, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-2000:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_twins_bf16_larger(tk, dtype):
    hq, hk, d, bs = 8, 2, 128, 16
    qlens, ctxs = [300, 1, 1, 64], [300, 1000, 17, 700]
    q, kp, vp, bt, ks, vs = paged_setup(hq, hk, d, bs, qlens, ctxs, dtype=dtype, num_blocks=200)
    cu, cl = ragged(qlens, ctxs)
    ref = reference(q, ks, vs, qlens, ctxs, d ** -0.5)
    out = tk.paged_attention(q, kp, vp, bt, cl, cu, max(qlens), d ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    kc = torch.zeros(4, 1024, hk, d, device=DEV, dtype=dtype)
    vc = torch.zeros_like(kc)
    for s, (c, k, v) in enumerate(zip(ctxs, ks, vs)):
        kc[s, :c], vc[s, :c] = k, v
    out2 = tk.contiguous_attention(q, kc, vc, torch.arange(4, dtype=torch.int32, device=DEV), cl, cu, max(qlens),
                                   d ** -0.5)
    torch.testing.assert_close(out2.float(), ref, atol=2e-2, rtol=2e-2)
