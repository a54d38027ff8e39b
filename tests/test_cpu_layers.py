"""The fused CPU layer ops (vattn/models/csrc/cpu_layers.cpp) against the plain-torch expressions they replace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from vattn.models import cpu_layers
from vattn.models.rope import apply_rope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu_layers.available():
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"no C++ compiler: {cpu_layers.EXTENSION.error}")
        pytest.fail(f"the fused CPU layer ops did not build: {cpu_layers.EXTENSION.error}")


def torch_rms(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_and_the_fused_residual_add(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 96, generator=g) * 3).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    torch.testing.assert_close(cpu_layers.rms_norm(x, w, 1e-6), torch_rms(x, w, 1e-6), **TOL[dtype])
    h, res = torch.randn(37, 96, generator=g).to(dtype), x.clone()
    want_res = res + h
    cpu_layers.add_rms_norm(h, res, w, 1e-5)
    torch.testing.assert_close(res, want_res, **TOL[dtype])
    torch.testing.assert_close(h, torch_rms(want_res, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_on_strided_qkv_views(dtype):
    """q and k are views of one fused projection output (token stride = q + 2 kv widths): only they change."""
    T, H, Hk, D = 11, 4, 2, 32
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(T, (H + 2 * Hk) * D, generator=g).to(dtype)
    before = qkv.clone()
    q, k, v = qkv.split((H * D, Hk * D, Hk * D), dim=-1)
    q, k = q.view(T, H, D), k.view(T, Hk, D)
    freqs = torch.arange(T).float()[:, None] * torch.rand(D // 2, generator=g)[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want_q, want_k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
    cpu_layers.rope_(q, cos, sin), cpu_layers.rope_(k, cos, sin)
    torch.testing.assert_close(q, want_q, **TOL[dtype])
    torch.testing.assert_close(k, want_k, **TOL[dtype])
    assert torch.equal(v, before[:, (H + Hk) * D:])


def test_bad_shapes_are_value_errors_naming_the_problem():
    with pytest.raises(ValueError, match="weight must be 1-d"):
        cpu_layers.rms_norm(torch.randn(4, 8), torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="must be 2-d"):
        cpu_layers.rms_norm(torch.randn(2, 4, 8), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="head_dim must be even"):
        cpu_layers.rope_(torch.randn(3, 2, 7), torch.randn(3, 7), torch.randn(3, 7))
    with pytest.raises(ValueError, match="cos and sin"):
        cpu_layers.rope_(torch.randn(3, 2, 8), torch.randn(4, 8), torch.randn(4, 8))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_decoder_gives_the_same_logits_fused_or_not(tiny_model, family, monkeypatch):
    """The same steps through a tiny model of each family with the fused ops and with plain torch."""
    from vattn.config import EngineConfig
    from vattn.engine import LLMEngine
    from vattn.sampling_params import SamplingParams

    def run() -> list[list[float]]:
        eng = LLMEngine(EngineConfig(model=tiny_model(family), device="cpu", dtype="float32",
                                     kv_cache_memory=1 << 22, max_model_len=128))
        try:
            eng.add_request("r", params=SamplingParams(max_tokens=6, temperature=0, logprobs=3),
                            prompt_token_ids=list(range(5, 40)))
            while eng.has_unfinished_requests():
                done = [o for o in eng.step() if o.finished]
            return [sorted(lp.values()) for lp in done[0].outputs[0].logprobs], done[0].outputs[0].token_ids
        finally:
            eng.close()

    fused_lps, fused_tokens = run()
    monkeypatch.setattr(cpu_layers, "use_for", lambda x: False)
    plain_lps, plain_tokens = run()
    assert fused_tokens == plain_tokens and len(fused_tokens) == 6
    torch.testing.assert_close(torch.tensor(fused_lps), torch.tensor(plain_lps), atol=1e-4, rtol=1e-4)


_NO_COMPILER = textwrap.dedent("""
    import warnings, torch
    from vattn.models import cpu_layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_layers.use_for(torch.zeros(2, 2))
        assert not cpu_layers.available()
    assert sum("could not be built" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
    print("ok")
""")


def test_no_compiler_means_plain_torch_with_one_warning(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "VATTN_KERNEL_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-c++")}
    r = subprocess.run([sys.executable, "-c", _NO_COMPILER], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.stdout[-500:], r.stderr[-2000:])


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 3072, 3077])
def test_argmax_is_torchs_first_index_of_the_max(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)
    x[1] = 0.5  # all tied: the first index
    x[2, vocab // 2:] = float("inf")  # ties at the max past the vector width
    x[3] = float("-inf")  # nothing finite: index 0
    x[4, vocab - 1] = float("nan")  # a NaN wins, wherever it is
    x[5, vocab // 3] = float("nan")
    x[5, vocab - 1] = float("nan")  # the first NaN
    x[6, -1] = 100.0  # the max in the scalar tail
    x[7] = -0.0
    x[7, vocab - 1] = 0.0  # -0 == +0: the first
    assert torch.equal(cpu_layers.argmax(x), x.argmax(dim=1))
    strided = torch.randn(vocab, 9, generator=g).t()  # a non-contiguous row axis
    assert torch.equal(cpu_layers.argmax(strided), strided.argmax(dim=1))
    assert torch.equal(cpu_layers.argmax(x[::2]), x[::2].argmax(dim=1))  # a row stride of two rows


def test_argmax_leaves_other_inputs_to_torch():
    x = torch.randn(3, 40, dtype=torch.float64)
    assert torch.equal(cpu_layers.argmax(x), x.argmax(dim=1))
    assert cpu_layers.argmax(torch.empty(0, 7)).shape == (0,)


@pytest.mark.parametrize("inter", [1, 15, 16, 40, 1536])
def test_silu_mul_matches_torch(inter):
    g = torch.Generator().manual_seed(inter)
    x = torch.randn(19, 2 * inter, generator=g) * 4
    x[0, 0], x[1, 0] = 120.0, -120.0  # past where e^-x saturates both ways
    x[2, 0] = float("nan")
    want = torch.nn.functional.silu(x[:, :inter]) * x[:, inter:]
    got = cpu_layers.silu_mul(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, equal_nan=True)
    wide = torch.randn(5, 2 * inter + 3, generator=g)[:, : 2 * inter]  # a row stride wider than the row
    torch.testing.assert_close(cpu_layers.silu_mul(wide),
                               torch.nn.functional.silu(wide[:, :inter]) * wide[:, inter:], atol=1e-6, rtol=1e-6)
    half = x.to(torch.bfloat16)  # other dtypes: torch's own ops
    torch.testing.assert_close(cpu_layers.silu_mul(half), torch.nn.functional.silu(half[:, :inter]) * half[:, inter:],
                               atol=0, rtol=0, equal_nan=True)
