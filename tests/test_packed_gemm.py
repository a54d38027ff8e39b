"""Linear layers against MKL-packed weights (vattn/models/packed_gemm.py) compute what F.linear computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vattn.loader import load_model
from vattn.models import packed_gemm

TOL = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def packable():
    if not packed_gemm.available():
        pytest.skip("MKL's packed GEMM is not available here (extension not built or torch without MKL)")


@pytest.mark.parametrize("n,k", [(1, 1), (17, 33), (300, 200), (3072, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_for_any_number_of_rows(n, k, bias):
    """The weight is packed once; products with 0, 1, a few, 128 and a ragged count of rows all use it."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    packed = packed_gemm.pack(w)
    for rows in (0, 1, 7, 128, 257):
        x = torch.randn(rows, k, generator=g)
        got = packed_gemm.linear(x, w, b, packed)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(x, w, b), **TOL)


def test_strided_inputs_and_the_fallbacks():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 40, generator=g)
    packed = packed_gemm.pack(w)
    wide = torch.randn(9, 64, generator=g)
    x = wide[:, 8:48]  # rows 64 floats apart: passed as MKL's leading dimension
    torch.testing.assert_close(packed_gemm.linear(x, w, None, packed), F.linear(x, w), **TOL)
    xt = torch.randn(40, 9, generator=g).t()  # column-major: copied, then packed product
    torch.testing.assert_close(packed_gemm.linear(xt, w, None, packed), F.linear(xt, w), **TOL)
    x3 = torch.randn(2, 5, 40, generator=g)  # not a matrix, another dtype, no packed weight: F.linear
    torch.testing.assert_close(packed_gemm.linear(x3, w, None, packed), F.linear(x3, w))
    xb, wb = x3[0].bfloat16(), w.bfloat16()
    torch.testing.assert_close(packed_gemm.linear(xb, wb, None, packed), F.linear(xb, wb))
    torch.testing.assert_close(packed_gemm.linear(x3[0], w, None, None), F.linear(x3[0], w))


def test_bad_inputs_are_value_errors_naming_the_problem():
    ext = packed_gemm.cpu_layers.EXTENSION.require()
    with pytest.raises(ValueError, match="float32"):
        packed_gemm.pack(torch.randn(4, 4).bfloat16())
    with pytest.raises(ValueError, match="empty"):
        packed_gemm.pack(torch.randn(0, 4))
    packed = packed_gemm.pack(torch.randn(8, 8))
    with pytest.raises(ValueError, match="another shape"):
        ext.packed_linear(torch.empty(2, 4096), torch.randn(2, 4096), packed, None)
    with pytest.raises(ValueError, match="rows"):
        ext.packed_linear(torch.empty(3, 8), torch.randn(2, 8), packed, None)
    with pytest.raises(ValueError, match="bias"):
        ext.packed_linear(torch.empty(2, 8), torch.randn(2, 8), packed, torch.randn(7))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_loaded_float32_model_has_every_linear_packed_and_the_same_logits(tiny_model, family):
    """qwen2: q/k/v biases and tied embeddings (the LM head's weight is the embedding's, packed as a copy)."""
    from vattn.models.llama import CausalLM

    model, spec = load_model(tiny_model(family), torch.float32, "cpu")
    assert isinstance(model, CausalLM)
    layers = [m for m in model.modules() if isinstance(m, packed_gemm.Linear)]
    assert len(layers) == 4 * spec.num_layers + 1 and all(m.packed is not None for m in layers)
    hidden = torch.randn(19, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    h = model.model.layers[0]
    packed = [h.self_attn.qkv_proj(hidden), h.mlp.gate_up_proj(hidden), model.compute_logits(hidden)]
    for m in layers:
        m.packed = None
    plain = [h.self_attn.qkv_proj(hidden), h.mlp.gate_up_proj(hidden), model.compute_logits(hidden)]
    for got, want in zip(packed, plain):
        torch.testing.assert_close(got, want, **TOL)
    if family == "qwen2":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_switched_off_or_another_dtype_means_no_packing(tiny_model, monkeypatch):
    model, _ = load_model(tiny_model("llama"), torch.bfloat16, "cpu")
    assert all(m.packed is None for m in model.modules() if isinstance(m, packed_gemm.Linear))
    monkeypatch.setenv("VATTN_PACKED_GEMM", "0")
    assert not packed_gemm.available()
    model, _ = load_model(tiny_model("llama"), torch.float32, "cpu")
    assert all(m.packed is None for m in model.modules() if isinstance(m, packed_gemm.Linear))
