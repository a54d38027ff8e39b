"""Our batched CPU attention kernel (vattn.attention.cpu_kernels), both twins, against a float64 reference, against the
per-sequence torch paths it replaces, over unmapped pages (in a subprocess), and its fallback when it cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vattn.attention import cpu_kernels
from vattn.attention.contiguous import ContiguousAttention
from vattn.attention.kernels import choose_kernel
from vattn.attention.metadata import AttentionMetadata
from vattn.attention.paged import PagedAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")


@pytest.fixture(scope="module", autouse=True)
def built():
    """The extension, built (or found in the cache). Without a C++ compiler there is nothing to test here: the
    fallback has its own test below; with one, a failed build is a failure."""
    if cpu_kernels.load() is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"no C++ compiler: {cpu_kernels.build_error()}")
        pytest.fail(f"the CPU attention kernel did not build: {cpu_kernels.build_error()}")


def reference(q, ks, vs, qlens, ctxs, scale):
    """float64, written out per query: q [T, H, D]; ks[i]/vs[i] [ctx_i, Hk, D] the full history of sequence i."""
    out, start = [], 0
    for qlen, ctx, k, v in zip(qlens, ctxs, ks, vs):
        g = q.shape[1] // k.shape[1]
        for j in range(qlen):
            pos = ctx - qlen + j  # sees keys 0..pos
            keys = k[: pos + 1].double().repeat_interleave(g, 1)
            vals = v[: pos + 1].double().repeat_interleave(g, 1)
            w = torch.einsum("hd,khd->hk", q[start + j].double(), keys) * scale
            out.append(torch.einsum("hk,khd->hd", w.softmax(-1), vals))
        start += qlen
    return torch.stack(out)


class Batch:
    """A ragged step: sequence i has ctxs[i] tokens after the step, of which the last qlens[i] are new.

    Holds the same history in a contiguous cache (per_layer: [S, L, Hk, D]; interleaved: layer 1's strided views of
    [S, L, 3 layers, k|v, Hk, D]) and in paged pools reached through shuffled block tables. Everything a kernel must
    not read (positions >= ctx, other rows, blocks past a table's last used entry) is NaN.
    """

    def __init__(self, hq, hk, d, bs, qlens, ctxs, dtype=torch.float32, layout="per_layer", prewrite=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.qlens, self.ctxs, self.bs, self.scale = qlens, ctxs, bs, d ** -0.5
        T, B = sum(qlens), len(qlens)
        self.q = torch.randn(T, hq, d, generator=g).to(dtype)
        self.ks = [torch.randn(c, hk, d, generator=g).to(dtype) for c in ctxs]
        self.vs = [torch.randn(c, hk, d, generator=g).to(dtype) for c in ctxs]
        self.k_new = torch.cat([k[c - n:] for k, c, n in zip(self.ks, ctxs, qlens)])
        self.v_new = torch.cat([v[c - n:] for v, c, n in zip(self.vs, ctxs, qlens)])
        S, L = B + 2, max(ctxs) + 5
        if layout == "per_layer":
            self.kc = torch.full((S, L, hk, d), NAN, dtype=dtype)
            self.vc = torch.full_like(self.kc, NAN)
        else:
            whole = torch.full((S, L, 3, 2, hk, d), NAN, dtype=dtype)
            self.kc, self.vc = whole[:, :, 1, 0], whole[:, :, 1, 1]
            assert self.kc.stride(1) == 3 * 2 * hk * d  # a token stride larger than Hk * D
        self.slots = torch.randperm(S, generator=g)[:B].tolist()
        blocks = [-(-c // bs) for c in ctxs]
        N = sum(blocks) + 3
        perm = torch.randperm(N, generator=g).tolist()
        self.poison_block = perm.pop()  # never used by a sequence: table padding points here
        self.kp = torch.full((N, bs, hk, d), NAN, dtype=dtype)
        self.vp = torch.full_like(self.kp, NAN)
        self.tables = []
        for n in blocks:
            self.tables.append(perm[:n])
            perm = perm[n:]
        for i, (c, n) in enumerate(zip(ctxs, qlens)):
            keep = c if prewrite else c - n  # without prewrite, the kernel writes the step's tokens itself
            self.kc[self.slots[i], :keep], self.vc[self.slots[i], :keep] = self.ks[i][:keep], self.vs[i][:keep]
            for p in range(keep):
                t = self.tables[i]
                self.kp[t[p // bs], p % bs], self.vp[t[p // bs], p % bs] = self.ks[i][p], self.vs[i][p]
        width = max(blocks) + 1
        self.bt = torch.tensor([t + [self.poison_block] * (width - len(t)) for t in self.tables], dtype=torch.int32)
        self.cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
        self.cl = torch.tensor(ctxs, dtype=torch.int32)
        self.slots_t = torch.tensor(self.slots, dtype=torch.int32)

    def reference(self):
        return reference(self.q, self.ks, self.vs, self.qlens, self.ctxs, self.scale)

    def contiguous(self, fused=True):
        new = dict(k_new=self.k_new, v_new=self.v_new) if fused else {}
        return cpu_kernels.contiguous_attention(self.q, self.kc, self.vc, self.slots_t, self.cl, self.cu, self.scale,
                                                **new)

    def paged(self, fused=True):
        new = dict(k_new=self.k_new, v_new=self.v_new) if fused else {}
        return cpu_kernels.paged_attention(self.q, self.kp, self.vp, self.bt, self.cl, self.cu, self.scale, **new)


CASES = [  # (query heads, kv heads, head_dim, block_size, query lens, context lens)
    (4, 2, 24, 5, [3, 1, 20, 1], [7, 13, 20, 40]),  # GQA, odd head_dim and block size; prefill + chunk + decode
    (2, 2, 16, 4, [1, 1, 1], [1, 4, 9]),  # decode only, MHA, a context of one token
    (8, 2, 64, 16, [37, 2, 1], [37, 100, 130]),  # a prefill over several query tiles, contexts over two key blocks
    (4, 1, 32, 16, [70], [150]),  # one long chunk after a cached prefix: tiles of different key ranges
    # a decode batch large enough that each sequence is one item over all its kv heads, beside a prefill
    (8, 4, 32, 8, [1] * 11 + [9], [3, 64, 65, 1, 130, 17, 5, 90, 33, 128, 2, 9]),
    # decode rows of groups larger than the decode path holds in registers at once (3 at head_dim 128, 5 at 64)
    (6, 2, 128, 16, [1, 1, 1, 2], [1, 16, 17, 50]),
    (10, 2, 64, 8, [1, 1, 1], [33, 7, 64]),
]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_contiguous_kernel_matches_float64_reference_and_writes_only_the_step(case, layout, dtype):
    b = Batch(*case, dtype=dtype, layout=layout)
    out = b.contiguous()
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), b.reference(), **TOL[dtype])
    for i, (s, c) in enumerate(zip(b.slots, b.ctxs)):  # the fused write landed exactly, nothing past ctx changed
        assert torch.equal(b.kc[s, :c], b.ks[i]) and torch.equal(b.vc[s, :c], b.vs[i])
        assert b.kc[s, c:].isnan().all() and b.vc[s, c:].isnan().all()
    others = [r for r in range(b.kc.shape[0]) if r not in b.slots]
    assert b.kc[others].isnan().all() and b.vc[others].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_paged_twin_matches_reference_and_equals_contiguous(case, dtype):
    b = Batch(*case, dtype=dtype)
    out = b.paged()
    torch.testing.assert_close(out.double(), b.reference(), **TOL[dtype])
    assert torch.equal(out, b.contiguous())  # one kernel, two layouts: the same arithmetic, bit for bit
    for i, (t, c) in enumerate(zip(b.tables, b.ctxs)):
        got = b.kp[t].flatten(0, 1)
        assert torch.equal(got[:c], b.ks[i]) and got[c:].isnan().all()
    assert b.kp[b.poison_block].isnan().all()


@pytest.mark.parametrize("case", CASES[:2], ids=["case0", "case1"])
def test_unfused_call_reads_a_prewritten_cache(case):
    b = Batch(*case, prewrite=True)
    torch.testing.assert_close(b.contiguous(fused=False).double(), b.reference(), **TOL[torch.float32])
    torch.testing.assert_close(b.paged(fused=False).double(), b.reference(), **TOL[torch.float32])


def test_threads_change_nothing():
    b = Batch(*CASES[2], prewrite=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = b.contiguous(fused=False)
        torch.set_num_threads(2)
        two = b.contiguous(fused=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(one).all() and torch.equal(one, two)  # each item is computed whole by one thread


def test_decode_items_of_all_heads_equal_per_head_items():
    """A decode batch big enough for whole-sequence items (>= 4 per thread) gives what per-head items give."""
    b = Batch(*CASES[4], prewrite=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # 12 sequences: whole-sequence decode items
        whole = b.contiguous(fused=False)
        torch.set_num_threads(4)  # 12 < 16: one item per (sequence, kv head)
        per_head = b.contiguous(fused=False)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(whole, per_head, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(whole.double(), b.reference(), **TOL[torch.float32])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), group=st.sampled_from([1, 2, 4]), hk=st.integers(1, 3), d=st.sampled_from([8, 17, 64]),
       bs=st.integers(1, 20), paged=st.booleans())
def test_random_ragged_batches(data, group, hk, d, bs, paged):
    n = data.draw(st.integers(1, 12), label="sequences")  # >= 4 per thread: decodes become whole-sequence items
    ctxs = data.draw(st.lists(st.integers(1, 140), min_size=n, max_size=n), label="ctxs")
    qlens = [data.draw(st.integers(1, c), label="qlen") if data.draw(st.booleans(), label="prefill") else 1
             for c in ctxs]
    b = Batch(group * hk, hk, d, bs, qlens, ctxs, seed=data.draw(st.integers(0, 2**16), label="seed"))
    out = b.paged() if paged else b.contiguous()
    torch.testing.assert_close(out.double(), b.reference(), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backends_match_the_per_sequence_paths_over_steps(dtype):
    """ContiguousAttention("cpu") vs ("sdpa") and PagedAttention("cpu") vs ("torch"): chunked prefill, then decode."""
    torch.manual_seed(0)
    H, Hk, D, bs, L = 4, 2, 16, 4, 48
    slots, tables = [3, 0, 1], [[5, 2, 9, 0, 7, 11], [1, 4, 8], [3, 6, 10, 12]]
    schedule = [([7, 5, 8], [7, 5, 8]), ([6, 1, 1], [13, 6, 9]), ([1, 1, 1], [14, 7, 10]), ([1, 1, 3], [15, 8, 13])]
    backends = {}
    for name in ("cpu", "sdpa"):
        kc, vc = (torch.full((4, L, Hk, D), NAN, dtype=dtype) for _ in range(2))
        backends[("contiguous", name)] = ContiguousAttention([kc], [vc], D ** -0.5, kernel=name)
    for name in ("cpu", "torch"):
        kp, vp = (torch.full((13, bs, Hk, D), NAN, dtype=dtype) for _ in range(2))
        backends[("paged", name)] = PagedAttention([kp], [vp], D ** -0.5, bs, kernel=name)
    assert {a.kernel for a in backends.values()} == {"cpu", "sdpa", "torch"}
    for qlens, ctxs in schedule:
        T = sum(qlens)
        q, k, v = (torch.randn(T, h, D).to(dtype) for h in (H, Hk, Hk))
        outs = {}
        for (kind, name), attn in backends.items():
            meta = (AttentionMetadata.build_contiguous(qlens, ctxs, slots) if kind == "contiguous"
                    else AttentionMetadata.build_paged(qlens, ctxs, tables, bs))
            outs[kind, name] = attn.forward(0, q, k, v, meta).float()
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1.6e-2, rtol=1.6e-2)
        torch.testing.assert_close(outs["contiguous", "cpu"], outs["contiguous", "sdpa"], **tol)
        torch.testing.assert_close(outs["paged", "cpu"], outs["paged", "torch"], **tol)
        assert torch.equal(outs["contiguous", "cpu"], outs["paged", "cpu"])


def test_auto_picks_the_cpu_kernel_on_cpu():
    cpu = torch.device("cpu")
    assert choose_kernel("vattention", "auto", cpu, torch.float32, 64) == "cpu"
    assert choose_kernel("paged", "auto", cpu, torch.bfloat16, 64, 16) == "cpu"
    assert choose_kernel("vattention", "auto", cpu, torch.float64, 64) == "sdpa"  # a dtype the kernel lacks
    with pytest.raises(ValueError, match="float64"):
        choose_kernel("paged", "cpu", cpu, torch.float64, 64, 16)
    with pytest.raises(ValueError, match="CPU tensors"):
        choose_kernel("vattention", "cpu", torch.device("cuda"), torch.float32, 64)
    with pytest.raises(ValueError, match="must be one of"):
        choose_kernel("vattention", "torch", cpu, torch.float32, 64)  # a paged-only name


def test_bad_inputs_raise_value_errors_naming_the_problem():
    b = Batch(4, 2, 16, 4, [2, 1], [5, 9])
    call = cpu_kernels.contiguous_attention
    with pytest.raises(ValueError, match="slot 7 out of range"):
        call(b.q, b.kc, b.vc, torch.tensor([0, 7], dtype=torch.int32), b.cl, b.cu, 1.0)
    with pytest.raises(ValueError, match="exceeds the cache's"):
        call(b.q, b.kc, b.vc, b.slots_t, torch.tensor([5, 99], dtype=torch.int32), b.cu, 1.0)
    with pytest.raises(ValueError, match="query length 2 must be between 0 and its context length 1"):
        call(b.q, b.kc, b.vc, b.slots_t, torch.tensor([1, 9], dtype=torch.int32), b.cu, 1.0)
    with pytest.raises(ValueError, match="cu_query_lens must run from 0 to T"):
        call(b.q, b.kc, b.vc, b.slots_t, b.cl, torch.tensor([0, 2, 2], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="int32"):
        call(b.q, b.kc, b.vc, b.slots_t.long(), b.cl, b.cu, 1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        call(b.q[:, :3].contiguous(), b.kc, b.vc, b.slots_t, b.cl, b.cu, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        call(b.q.double(), b.kc, b.vc, b.slots_t, b.cl, b.cu, 1.0)
    with pytest.raises(ValueError, match="k_new / v_new must be"):
        call(b.q, b.kc, b.vc, b.slots_t, b.cl, b.cu, 1.0, k_new=b.k_new[:1], v_new=b.v_new[:1])
    with pytest.raises(ValueError, match="both k_new and v_new"):
        call(b.q, b.kc, b.vc, b.slots_t, b.cl, b.cu, 1.0, k_new=b.k_new)
    paged = cpu_kernels.paged_attention
    with pytest.raises(ValueError, match="needs 3 blocks, its block table has 2"):
        paged(b.q, b.kp, b.vp, b.bt[:, :2].contiguous(), b.cl, b.cu, 1.0)
    bad = b.bt.clone()
    bad[1, 0] = 1000
    with pytest.raises(ValueError, match="block table entry 0 = 1000 out of range"):
        paged(b.q, b.kp, b.vp, bad, b.cl, b.cu, 1.0)


_UNMAPPED_PROBE = textwrap.dedent("""
    import sys, torch
    from allocator import PagePool, VirtualTensor, open_backend
    from vattn.attention import cpu_kernels
    layout, dtype, probe = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3] == "1"
    page = 64 * 1024
    pool = PagePool(open_backend("host", page_size=page), 64 * page)
    hk, d, H, L, S = 2, 16, 4, 2048, 4
    if layout == "per_layer":  # [S, L, Hk, D]: one tensor for K, one for V
        vts = [VirtualTensor(pool, (S, L, hk, d), dtype) for _ in range(2)]
        kc, vc = vts[0].tensor, vts[1].tensor
    else:  # [S, L, layers, k|v, Hk, D]: layer 1's views, token stride 4 * Hk * D
        vts = [VirtualTensor(pool, (S, L, 2, 2, hk, d), dtype)]
        kc, vc = vts[0].tensor[:, :, 1, 0], vts[0].tensor[:, :, 1, 1]
    tok_bytes = vts[0].tensor[0, 0].numel() * vts[0].tensor.element_size()
    per_page = page // tok_bytes
    slots = [3, 1]
    ctxs = [2 * per_page, 37]  # the first row is mapped exactly up to a page boundary at ctx
    qlens = [per_page + 5, 1]  # a prefill chunk whose tokens cross a page boundary, and a decode
    row_pages = L * tok_bytes // page
    for vt in vts:
        for s, c in zip(slots, ctxs):
            vt.map(s * row_pages, -(-c // per_page))  # every other page of every row stays unmapped
    g = torch.Generator().manual_seed(0)
    for s, c, n in zip(slots, ctxs, qlens):
        kc[s, : c - n] = torch.randn(c - n, hk, d, generator=g).to(dtype)
        vc[s, : c - n] = torch.randn(c - n, hk, d, generator=g).to(dtype)
    T = sum(qlens)
    q, kn, vn = (torch.randn(T, h, d, generator=g).to(dtype) for h in (H, hk, hk))
    out = cpu_kernels.contiguous_attention(
        q, kc, vc, torch.tensor(slots, dtype=torch.int32), torch.tensor(ctxs, dtype=torch.int32),
        torch.tensor([0, qlens[0], T], dtype=torch.int32), d ** -0.5, k_new=kn, v_new=vn)
    assert torch.isfinite(out).all()
    assert torch.equal(kc[slots[0], ctxs[0] - 1], kn[qlens[0] - 1])
    print("ok", flush=True)
    if probe:
        print(kc[slots[0], ctxs[0]].sum())  # one position past ctx: must fault, proving the pages are unmapped
""")


@pytest.mark.parametrize("layout,dtype", [("per_layer", "float32"), ("interleaved", "bfloat16")])
def test_contiguous_kernel_never_touches_unmapped_pages(layout, dtype):
    """Rows mapped exactly up to ctx on a page boundary: the kernel runs clean ("ok"), then one read of the position
    at ctx kills the child by SIGSEGV, proving the pages past ctx really are unmapped."""
    r = subprocess.run([sys.executable, "-c", _UNMAPPED_PROBE, layout, dtype, "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.stdout.startswith("ok"), (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert r.returncode == -11, (r.returncode, r.stderr[-2000:])


_NO_COMPILER = textwrap.dedent("""
    import warnings, torch
    from vattn.attention import cpu_kernels
    from vattn.attention.contiguous import ContiguousAttention
    from vattn.attention.paged import PagedAttention
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = ContiguousAttention([torch.zeros(2, 8, 1, 16)], [torch.zeros(2, 8, 1, 16)], 0.25)
        p = PagedAttention([torch.zeros(2, 4, 1, 16)], [torch.zeros(2, 4, 1, 16)], 0.25, 4)
    assert (c.kernel, p.kernel) == ("sdpa", "torch"), (c.kernel, p.kernel)
    assert sum("could not be built" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
    try:
        ContiguousAttention([torch.zeros(2, 8, 1, 16)], [torch.zeros(2, 8, 1, 16)], 0.25, kernel="cpu")
    except ValueError as e:
        assert "could not be built" in str(e), e
    else:
        raise AssertionError("kernel='cpu' without a build must raise")
    assert cpu_kernels.main(["--build"]) == 1
    print("ok")
""")


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """A fresh cache directory and a compiler that does not exist: "auto" takes the per-sequence paths."""
    env = {**os.environ, "PYTHONPATH": ROOT, "VATTN_KERNEL_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-c++")}
    r = subprocess.run([sys.executable, "-c", _NO_COMPILER], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-1000:], r.stderr[-3000:])


def test_the_kernel_runs_without_the_interpreter_lock():
    """Another Python thread runs while one long attention call computes (the page-mapping helper relies on it):
    it records times strictly inside the call, which it could not do if the call held the interpreter lock."""
    import threading
    import time

    kc = torch.randn(8, 4096, 4, 64)
    vc = torch.randn_like(kc)
    q = torch.randn(8 * 256, 8, 64)
    rows = torch.arange(8, dtype=torch.int32)
    ctx = torch.full((8,), 4096, dtype=torch.int32)
    cu = torch.arange(0, 9, dtype=torch.int32) * 256
    stamps, stop = [], threading.Event()

    def beat():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    helper = threading.Thread(target=beat)
    helper.start()
    try:
        time.sleep(0.01)
        t0 = time.perf_counter()
        cpu_kernels.contiguous_attention(q, kc, vc, rows, ctx, cu, 0.125)  # 8 x 256 queries over 4096 keys
        t1 = time.perf_counter()
    finally:
        stop.set()
        helper.join()
    assert t1 - t0 > 0.02, "the call was too short to tell"
    inside = [t for t in stamps if t0 + 0.25 * (t1 - t0) < t < t1 - 0.25 * (t1 - t0)]
    assert inside, f"no beat of the other thread in the middle of a {t1 - t0:.3f} s call"
