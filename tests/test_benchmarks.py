"""Smoke tests: every benchmark runs end to end at tiny sizes and writes JSON with the expected keys and sane values."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_kernels, bench_sharing, compare
from benchmarks.workloads import DISTS, make_workload


@pytest.fixture(scope="module")
def tiny_bench_model(tmp_path_factory):
    from benchmarks.common import PRESETS
    from tests.tiny_models import get_tiny_model

    return str(get_tiny_model("llama", tmp_path_factory.mktemp("bench_models"), **PRESETS["tiny"]))


def test_workloads_are_seeded_and_follow_the_published_means():
    a = make_workload("sharegpt", 400, scale=1.0, seed=3)
    b = make_workload("sharegpt", 400, scale=1.0, seed=3)
    assert [r.prompt_token_ids for r in a.requests] == [r.prompt_token_ids for r in b.requests]
    assert make_workload("sharegpt", 5, seed=4).requests[0].prompt_token_ids != a.requests[0].prompt_token_ids
    for dist, wl in (("sharegpt", a), ("alpaca", make_workload("alpaca", 400, seed=1))):
        s, d = wl.summary(), DISTS[dist]
        # clipping at 1024 / 2048 trims the tail a little: within 25% of the published means
        assert 0.75 * d.prompt_mean < s["prompt_mean"] < 1.25 * d.prompt_mean
        assert 0.75 * d.output_mean < s["output_mean"] < 1.25 * d.output_mean
        assert all(len(r.prompt_token_ids) + r.max_tokens <= d.max_total for r in wl.requests)
        assert all(min(r.prompt_token_ids) >= 2 for r in wl.requests)  # never BOS / EOS
    small = make_workload("sharegpt", 50, scale=0.1, seed=0, rate=5.0)
    assert small.max_total_len <= 204
    arrivals = [r.arrival for r in small.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


@pytest.mark.parametrize("kw, field", [(dict(dist="x"), "dist"), (dict(num_requests=0), "num_requests"),
                                       (dict(scale=0), "scale"), (dict(rate=-1.0), "rate")])
def test_workload_rejects_bad_input(kw, field):
    args = dict(dist="alpaca", num_requests=3) | kw
    with pytest.raises(ValueError, match=field):
        make_workload(**args)


def test_compare_runs_both_paths_and_checks_tokens(tiny_bench_model, tmp_path):
    out = tmp_path / "cmp.json"
    payload = compare.main(["--model", tiny_bench_model, "--num-requests", "4", "--scale", "0.03",
                            "--page-sizes", "4K", "--kv-layouts", "per_layer,interleaved", "--kv-memory", "4M",
                            "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(payload["results"]))
    assert (tmp_path / "cmp.txt").read_text().startswith("machine: ")
    assert saved["tokens_identical_across_paths"] is True
    for key in ("machine", "command", "load_avg_start", "load_avg_end", "workload", "block_size", "page_sizes"):
        assert key in saved
    rows = {r["path"]: r for r in saved["results"]}
    assert set(rows) == {"paged", "vattention@4K", "vattention@4K/interleaved"}
    assert rows["vattention@4K/interleaved"]["tokens_per_unit"] < rows["vattention@4K"]["tokens_per_unit"]
    total_out = saved["workload"]["total_output_tokens"]
    for r in rows.values():
        assert r["output_tokens"] == total_out
        assert r["output_tokens_per_s"] > 0 and r["total_time_s"] > 0 and r["mean_ttft_s"] > 0
        assert r["peak_mapped_bytes"] >= r["peak_used_bytes"] > 0
        assert 0 < r["mean_used_fraction_of_mapped"] <= 1
        assert r["preemptions"] >= 0 and r["map_wait_seconds"] >= 0
    assert rows["paged"]["throughput_ratio"] == 1.0 and rows["paged"]["map_wait_seconds"] == 0
    v = rows["vattention@4K"]
    assert v["throughput_ratio"] == pytest.approx(v["output_tokens_per_s"] / rows["paged"]["output_tokens_per_s"])
    assert v["peak_mapped_ratio"] == pytest.approx(v["peak_mapped_bytes"] / rows["paged"]["peak_mapped_bytes"])


def test_compare_token_check_can_fail():
    wl = make_workload("alpaca", 2, seed=0)
    ids = [r.request_id for r in wl.requests]
    a = {"metrics": {"path": "paged"}, "tokens": {ids[0]: [5, 6, 7], ids[1]: [1]}}
    b = {"metrics": {"path": "vattention@4K"}, "tokens": {ids[0]: [5, 9, 7], ids[1]: [1]}}
    assert compare.check_tokens([a, a], wl) == 0
    with pytest.raises(compare.TokenMismatchError, match=f"{ids[0]} at output token 1"):
        compare.check_tokens([a, b], wl)
    # a divergence where the reference's own logprobs show a near-tie is float noise, not a different computation
    lp = [{5: -0.1}, {6: -1.0, 9: -1.0 - compare.NEAR_TIE / 2}, {7: -0.2}]
    a_tie = {**a, "logprobs": {ids[0]: lp, ids[1]: [{1: -0.5}]}}
    assert compare.check_tokens([a_tie, b], wl) == 1
    lp_far = [{5: -0.1}, {6: -1.0, 9: -1.5}, {7: -0.2}]
    with pytest.raises(compare.TokenMismatchError):
        compare.check_tokens([{**a, "logprobs": {ids[0]: lp_far, ids[1]: [{1: -0.5}]}}, b], wl)


def test_sharing_saves_memory_for_beams(tiny_bench_model, tmp_path):
    out = tmp_path / "sharing.json"
    compare_args = ["--model", tiny_bench_model, "--num-requests", "2", "--widths", "2,3", "--scale", "0.5",
                    "--page-sizes", "4K", "--kv-memory", "8M", "--out", str(out)]
    bench_sharing.main(compare_args)
    saved = json.loads(out.read_text())
    rows = saved["results"]
    assert {(r["path"], r["mode"], r["width"]) for r in rows} == {
        (p, m, w) for p in ("paged", "vattention@4K", "vattention@4K/interleaved")
        for m in ("parallel", "beam") for w in (2, 3)}
    for r in rows:
        assert 0 < r["shared_peak_units"] <= r["unshared_peak_units"]
        assert r["saved_peak_pct"] == pytest.approx(100 * (1 - r["shared_peak_units"] / r["unshared_peak_units"]))
        assert r["shared_peak_bytes"] == r["shared_peak_units"] * r["unit_bytes"]
    # forked beams share their prompt and common history: strictly less memory than independent requests
    assert all(r["saved_mean_pct"] > 0 for r in rows if r["mode"] == "beam")


def test_kernel_bench_cpu(tmp_path):
    out = tmp_path / "kernels.json"
    bench_kernels.main(["--batch", "2", "--prefill-batch", "1", "--contexts", "40", "--heads", "4", "--kv-heads", "2",
                        "--head-dim", "16", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    variants = {(r["phase"], r["variant"]) for r in saved["results"]}
    assert variants == {(p, v) for p in ("decode", "prefill")
                        for v in ("contiguous_sdpa", "paged_torch", "interleaved_sdpa")}
    for r in saved["results"]:
        assert r["median_us"] >= r["min_us"] > 0
        if r["variant"] == "paged_torch":
            assert r["paged_over_contiguous"] > 0
        if r["variant"] == "interleaved_sdpa":
            assert r["interleaved_over_contiguous"] > 0


def test_benchmarks_reject_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--repeats"):
        compare.main(["--repeats", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="--widths"):
        bench_sharing.main(["--widths", "1", "--out", str(tmp_path / "y.json")])
    with pytest.raises(ValueError, match="--heads"):
        bench_kernels.main(["--heads", "6", "--kv-heads", "4", "--out", str(tmp_path / "z.json")])


_TRITON_TWIN = r"""
import torch
from vattn.attention.contiguous import ContiguousAttention
from vattn.attention.metadata import AttentionMetadata
g = torch.Generator().manual_seed(0)
k, v = torch.randn(3, 40, 2, 16, generator=g), torch.randn(3, 40, 2, 16, generator=g)
q, kn, vn = torch.randn(7, 4, 16, generator=g), torch.randn(7, 2, 16, generator=g), torch.randn(7, 2, 16, generator=g)
meta = AttentionMetadata.build_contiguous([1, 6], [30, 12], [2, 0])  # a decode and a later prefill chunk
outs = []
for kernel in ("sdpa", "triton"):
    kc, vc = k.clone(), v.clone()
    attn = ContiguousAttention([kc], [vc], 0.25, kernel=kernel)
    assert attn.kernel == kernel
    outs.append(attn.forward(0, q, kn, vn, meta))
err = (outs[0] - outs[1]).abs().max().item()
assert err < 1e-4, err
print("ok", err)
"""


def test_contiguous_attention_triton_kernel_matches_sdpa():
    """kernel="triton" (the contiguous Triton twin) under the interpreter, in a fresh process (TRITON_INTERPRET)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_TWIN], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_contiguous_attention_triton_kernel_needs_cuda_or_interpreter(monkeypatch):
    import torch

    from vattn.attention.contiguous import ContiguousAttention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kc = torch.zeros(1, 8, 1, 16)
    with pytest.raises(ValueError, match="triton"):
        ContiguousAttention([kc], [kc.clone()], 0.25, kernel="triton")
