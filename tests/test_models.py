"""Our model code + loader + ContiguousAttention against Hugging Face transformers on tiny checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.tiny_models import FAMILIES, get_tiny_model
from vattn.attention import AttentionMetadata, ContiguousAttention
from vattn.loader import load_model

MAX_SEQS, MAX_LEN = 4, 64


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


class Runner:
    """A minimal step loop over plain zero-filled caches: enough to drive the model like the engine does."""

    def __init__(self, model, spec, kernel="sdpa", fill=0.0):
        shape = (MAX_SEQS, MAX_LEN, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.full(shape, fill, dtype=spec.dtype) for _ in range(spec.num_layers)]
        self.v = [torch.full(shape, fill, dtype=spec.dtype) for _ in range(spec.num_layers)]
        self.model = model
        model.attn_backend = ContiguousAttention(self.k, self.v, spec.head_dim**-0.5, kernel=kernel)
        self.cached: dict[int, int] = {}  # slot -> tokens in cache

    def step(self, work: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """work: (slot, new tokens) per sequence -> float32 logits [len(new tokens), vocab] per sequence."""
        qlens = [len(toks) for _, toks in work]
        ctx = [self.cached.get(slot, 0) + n for (slot, _), n in zip(work, qlens)]
        meta = AttentionMetadata.build_contiguous(qlens, ctx, [slot for slot, _ in work], "cpu")
        ids = torch.tensor([t for _, toks in work for t in toks])
        hidden = self.model(ids, meta.token_positions, meta)
        for (slot, _), c in zip(work, ctx):
            self.cached[slot] = c
        return list(self.model.compute_logits(hidden).split(qlens))


def prompts(n_tokens: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in n_tokens]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_logits_match_hf(family, tiny_root):
    """Two prefills + a chunk in one step, then chunk 2 beside decodes, then decodes: logits == HF."""
    path = get_tiny_model(family, tiny_root)
    model, spec = load_model(path, torch.float32, "cpu")
    ref = hf_model(path)
    a, b, c = prompts([7, 12, 10], spec.vocab_size, seed=1)
    extra = prompts([4, 4, 3], spec.vocab_size, seed=2)  # fed one token per decode step
    run = Runner(model, spec)
    slot_a, slot_b, slot_c = 2, 0, 3  # unsorted, with a gap: slot indexing must matter
    out = {s: [] for s in (slot_a, slot_b, slot_c)}
    seqs = {slot_a: list(a), slot_b: list(b), slot_c: list(c)}
    steps = [
        [(slot_a, a), (slot_b, b), (slot_c, c[:6])],
        [(slot_a, extra[0][:1]), (slot_c, c[6:]), (slot_b, extra[1][:1])],
    ] + [[(slot_a, extra[0][i : i + 1]), (slot_b, extra[1][i : i + 1]), (slot_c, extra[2][i - 1 : i])] for i in (1, 2, 3)]
    for work in steps:
        for (slot, _toks), lg in zip(work, run.step(work)):
            out[slot].append(lg)
    seqs[slot_a] += extra[0]
    seqs[slot_b] += extra[1]
    seqs[slot_c] += extra[2]
    for slot, ids in seqs.items():
        ours = torch.cat(out[slot])
        theirs = hf_logits(ref, ids)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kernel", ["sdpa", "cpu"])
def test_keep_rows_runs_the_last_layer_on_those_rows_only(family, kernel, tiny_root):
    """forward(..., keep_rows) returns exactly the kept rows of the full forward, every token's K/V still lands in
    every layer's cache (the next step sees the whole prompt), and the last layer's MLP sees only the kept rows."""
    from vattn.attention import cpu_kernels

    if kernel == "cpu" and not cpu_kernels.available():
        pytest.skip("the C++ kernel cannot be built here")
    path = get_tiny_model(family, tiny_root)
    model, spec = load_model(path, torch.float32, "cpu")
    a, b = prompts([9, 5], spec.vocab_size, seed=3)
    meta = AttentionMetadata.build_contiguous([9, 5], [9, 5], [1, 3], "cpu")
    ids = torch.tensor(a + b)
    full_run = Runner(model, spec, kernel)  # each Runner gives the model its own caches
    full = model(ids, meta.token_positions, meta)
    kept_run = Runner(model, spec, kernel)
    seen = []
    hook = model.model.layers[-1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    keep = torch.tensor([8, 13, 2])  # the two sequences' last tokens and one more row, in any order
    try:
        kept = model(ids, meta.token_positions, meta, keep)
    finally:
        hook.remove()
    assert seen == [3]
    torch.testing.assert_close(kept, full[keep], atol=1e-5, rtol=1e-5)
    for layer in range(spec.num_layers):  # the pruned forward wrote the same cache as the full one
        torch.testing.assert_close(kept_run.k[layer], full_run.k[layer])
        torch.testing.assert_close(kept_run.v[layer], full_run.v[layer])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(family, tiny_root):
    from transformers import AutoTokenizer

    path = get_tiny_model(family, tiny_root)
    model, spec = load_model(path, torch.float32, "cpu")
    ref = hf_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["The if statement", "Assignment statements are used to (re)bind names to values", "x"]
    ids = [tok(t)["input_ids"] for t in texts]
    n_new = 10
    expected = []
    for p in ids:
        with torch.no_grad():
            gen = ref.generate(torch.tensor([p]), max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
        expected.append(gen[0, len(p) :].tolist())

    run = Runner(model, spec)
    slots = [1, 3, 0]
    got = [[] for _ in ids]
    work = list(zip(slots, ids))
    active = list(range(len(ids)))
    for _ in range(n_new):
        logits = run.step([work[i] for i in active])
        still = []
        for i, lg in zip(active, logits):
            t = int(lg[-1].argmax())
            got[i].append(t)
            work[i] = (slots[i], [t])
            if t not in spec.eos_token_ids:
                still.append(i)
        active = still
        if not active:
            break
    assert got == expected
    distinct = {t for seq in got for t in seq}
    assert len(distinct) > 5, f"degenerate tiny model: greedy tokens {got}"


def test_bf16_close_to_hf(tiny_root):
    path = get_tiny_model("qwen3", tiny_root)
    model, spec = load_model(path, torch.bfloat16, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and spec.dtype == torch.bfloat16
    ref = hf_model(path, torch.bfloat16)
    a, b = prompts([9, 5], spec.vocab_size, seed=3)
    run = Runner(model, spec)
    la, lb = run.step([(1, a[:6]), (2, b)])
    (la2,) = run.step([(1, a[6:])])
    ours, theirs = torch.cat([la, la2]), hf_logits(ref, a)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() < 0.05 * scale
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.8
    torch.testing.assert_close(lb, hf_logits(ref, b), atol=0.05 * float(scale), rtol=0)


def test_llama3_rope_scaling_and_sharded_checkpoint(tiny_root):
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16)
    path = get_tiny_model("llama", tiny_root, rope_parameters=rope, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists()
    model, spec = load_model(path, torch.float32, "cpu")
    assert model.config.rope_type == "llama3"
    ids = prompts([40], spec.vocab_size, seed=4)[0]  # longer than original_max_position_embeddings
    (ours,) = Runner(model, spec).step([(0, ids)])
    torch.testing.assert_close(ours, hf_logits(hf_model(path), ids), atol=1e-4, rtol=1e-4)


def test_legacy_rope_keys_and_tied_embeddings(tiny_root, tmp_path):
    src = get_tiny_model("qwen2", tiny_root)
    dst = tmp_path / "legacy"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"] = params["rope_theta"], None
    (dst / "config.json").write_text(json.dumps(cfg))
    model, spec = load_model(dst, torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert spec.architecture == "Qwen2ForCausalLM" and spec.eos_token_ids == (1,)
    ref_model, _ = load_model(src, torch.float32, "cpu")
    ids = prompts([8], spec.vocab_size, seed=5)[0]
    (x,) = Runner(model, spec).step([(0, ids)])
    (y,) = Runner(ref_model, spec).step([(0, ids)])
    torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_spec_fields(tiny_root):
    model, spec = load_model(get_tiny_model("qwen3", tiny_root), torch.float32, "cpu")
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, 2, 32)
    assert (spec.hidden_size, spec.vocab_size, spec.max_position_embeddings) == (64, 512, 512)
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4
    assert model.model.layers[0].self_attn.q_norm is not None


def test_bad_checkpoints_raise_naming_the_problem(tiny_root, tmp_path):
    src = get_tiny_model("llama", tiny_root)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, torch.float32, "cpu")
    bad = tmp_path / "gpt2"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(bad, torch.float32, "cpu")
    noweights = tmp_path / "noweights"
    shutil.copytree(src, noweights)
    os.remove(noweights / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(noweights, torch.float32, "cpu")
    rope = tmp_path / "rope"
    shutil.copytree(src, rope)
    cfg = json.loads((rope / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (rope / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="yarn"):
        load_model(rope, torch.float32, "cpu")
    # a checkpoint of another shape: the weight that does not fit is named
    other = get_tiny_model("llama", tiny_root, intermediate_size=96)
    shutil.copy(other / "model.safetensors", noweights / "model.safetensors")
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.* has shape"):
        load_model(noweights, torch.float32, "cpu")


def test_metadata_validation_and_positions():
    meta = AttentionMetadata.build_contiguous([3, 1, 2], [3, 9, 6], [5, 0, 2], "cpu")
    assert meta.token_positions.tolist() == [0, 1, 2, 8, 4, 5]
    assert meta.token_slots.tolist() == [5, 5, 5, 0, 2, 2]
    assert meta.cu_query_lens.tolist() == [0, 3, 4, 6] and meta.cu_query_lens.dtype == torch.int32
    assert (meta.max_query_len, meta.max_context_len, meta.num_tokens) == (3, 9, 6)
    with pytest.raises(ValueError, match="context_lens"):
        AttentionMetadata.build_contiguous([4], [3], [0])
    with pytest.raises(ValueError, match="slots"):
        AttentionMetadata.build_contiguous([1, 1], [2, 2], [1, 1])
    with pytest.raises(ValueError, match="query_lens"):
        AttentionMetadata.build_contiguous([0], [2], [0])
    paged = AttentionMetadata.build_paged([2, 1], [5, 3], [[7, 3], [4]], block_size=4)
    assert paged.slot_mapping.tolist() == [7 * 4 + 3, 3 * 4 + 0, 4 * 4 + 2]  # positions 3, 4 and 2
    assert paged.block_tables.tolist() == [[7, 3], [4, 0]]


def _reference_attention(q, kc, vc, slots, qlens, ctxs, scale):
    """Naive per-query softmax attention, written independently of the kernel under test."""
    out, start = [], 0
    group = q.shape[1] // kc.shape[2]
    for slot, ql, ctx in zip(slots, qlens, ctxs):
        for j in range(ql):
            pos = ctx - ql + j
            keys = kc[slot, : pos + 1].repeat_interleave(group, dim=1)  # [pos+1, H, D]
            vals = vc[slot, : pos + 1].repeat_interleave(group, dim=1)
            w = torch.einsum("hd,khd->hk", q[start + j], keys) * scale
            out.append(torch.einsum("hk,khd->hd", w.softmax(-1), vals))
        start += ql
    return torch.stack(out)


def test_sdpa_kernel_never_reads_past_context():
    """Cache positions >= context_len and rows of other slots are NaN: the output must stay finite and exact."""
    torch.manual_seed(0)
    S, L, H, Hk, D = 5, 32, 4, 2, 16
    kc, vc = torch.full((S, L, Hk, D), float("nan")), torch.full((S, L, Hk, D), float("nan"))
    slots, qlens, ctxs = [3, 1, 4], [1, 5, 7], [9, 12, 7]
    for slot, ql, ctx in zip(slots, qlens, ctxs):  # the history before this step
        kc[slot, : ctx - ql] = torch.randn(ctx - ql, Hk, D)
        vc[slot, : ctx - ql] = torch.randn(ctx - ql, Hk, D)
    T = sum(qlens)
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hk, D), torch.randn(T, Hk, D)
    backend = ContiguousAttention([kc], [vc], D**-0.5, kernel="sdpa")
    meta = AttentionMetadata.build_contiguous(qlens, ctxs, slots)
    out = backend.forward(0, q, k, v, meta)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference_attention(q, kc, vc, slots, qlens, ctxs, D**-0.5), atol=1e-5, rtol=1e-5)
    assert torch.isnan(kc[0]).all() and torch.isnan(kc[3, 9:]).all()  # nothing written outside the step's tokens


GUARD_SCRIPT = textwrap.dedent(
    """
    import ctypes, mmap, torch
    from vattn.attention import AttentionMetadata, ContiguousAttention
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    S, L, Hk, D, H = 4, 128, 2, 16, 4
    row = L * Hk * D * 4  # bytes per slot row; 32 tokens per 4 KiB page
    tok = Hk * D * 4
    slots, qlens, ctxs = [2, 0], [3, 1], [64, 32]
    caches = []
    for _ in range(2):
        addr = libc.mmap(None, S * row, 0,  # PROT_NONE
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        for slot, ctx in zip(slots, ctxs):  # only [slot, :ctx] is accessible, like mapped pages
            assert libc.mprotect(addr + slot * row, ctx * tok, mmap.PROT_READ | mmap.PROT_WRITE) == 0
        buf = (ctypes.c_float * (S * L * Hk * D)).from_address(addr)
        caches.append(torch.frombuffer(buf, dtype=torch.float32).view(S, L, Hk, D))
    kc, vc = caches
    for slot, ql, ctx in zip(slots, qlens, ctxs):
        kc[slot, : ctx - ql] = torch.randn(ctx - ql, Hk, D)
        vc[slot, : ctx - ql] = torch.randn(ctx - ql, Hk, D)
    T = sum(qlens)
    backend = ContiguousAttention([kc], [vc], D ** -0.5, kernel="sdpa")
    meta = AttentionMetadata.build_contiguous(qlens, ctxs, slots)
    out = backend.forward(0, torch.randn(T, H, D), torch.randn(T, Hk, D), torch.randn(T, Hk, D), meta)
    assert torch.isfinite(out).all()
    print("GUARD_OK")
    if PROBE:
        kc[1, 0].sum()  # an unmapped row: must fault, proving the guard pages are real
    """
)


@pytest.mark.parametrize("probe", [False, True])
def test_sdpa_kernel_under_guard_pages(probe):
    """Real PROT_NONE memory beyond each context: the kernel runs clean; a deliberate read faults (SIGSEGV)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"PROBE = {probe}\n" + GUARD_SCRIPT
    res = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert "GUARD_OK" in res.stdout, res.stderr
    if probe:
        assert res.returncode == -11, (res.returncode, res.stderr[-2000:])
    else:
        assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["torch_flash", "flash_attn"])
@pytest.mark.parametrize("qlens,ctxs", [([1, 1, 1], [300, 17, 1]), ([1, 40, 7], [300, 40, 90])])
def test_gpu_kernels_match_sdpa(kernel, qlens, ctxs):
    from vattn.attention.contiguous import flash_attn_available

    if kernel == "flash_attn" and not flash_attn_available():
        pytest.skip("flash-attn not installed")
    torch.manual_seed(0)
    S, L, H, Hk, D = 6, 512, 8, 2, 64
    slots = [4, 0, 2]
    dev, dt = "cuda", torch.bfloat16
    caches = {}
    for name in ("k", "v"):
        base = torch.randn(S, L, Hk, D, device=dev, dtype=dt)
        for slot, ctx in zip(slots, ctxs):
            base[slot, ctx:] = float("nan")  # beyond context: must never be read
        caches[name] = base
    T = sum(qlens)
    q, k, v = (torch.randn(T, h, D, device=dev, dtype=dt) for h in (H, Hk, Hk))
    meta = AttentionMetadata.build_contiguous(qlens, ctxs, slots, dev)
    ref = ContiguousAttention([caches["k"].clone()], [caches["v"].clone()], D**-0.5, "sdpa").forward(0, q, k, v, meta)
    out = ContiguousAttention([caches["k"]], [caches["v"]], D**-0.5, kernel).forward(0, q, k, v, meta)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
