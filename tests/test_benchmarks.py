"""The moved pieces of the old benchmark scripts: seeded workloads, the dtype-aware greedy-token check, and the
benchmarks/*.py shims (scripts/gpu_run.sh still calls them) over vattn.bench. The modes' own smoke tests are in
tests/test_bench.py."""

from __future__ import annotations

import json

import pytest
import torch

from vattn.bench.tokens import FLOAT32_NEAR_TIE, check_tokens, near_tie_tolerance
from vattn.bench.workloads import DISTS, KINDS, make_workload


@pytest.fixture(scope="module", autouse=True)
def bench_models(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("VATTN_BENCH_MODELS", str(tmp_path_factory.mktemp("bench_models")))
    mp.setenv("VATTN_PEERS_VENV", str(tmp_path_factory.mktemp("no-peers")))
    yield
    mp.undo()


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
        assert all(min(r.prompt_token_ids) >= 3 for r in wl.requests)  # never a special token
    small = make_workload("sharegpt", 50, scale=0.1, seed=0, rate=5.0)
    assert small.max_total_len <= 204
    arrivals = [r.arrival for r in small.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


def test_every_workload_kind():
    fixed = make_workload("fixed", 5, input_len=7, output_len=3)
    assert {(len(r.prompt_token_ids), r.max_tokens) for r in fixed.requests} == {(7, 3)}
    long = make_workload("long-context", 20, input_len=400)
    assert all(300 <= len(r.prompt_token_ids) <= 400 for r in long.requests)
    few_shot = make_workload("shared-prefix", 6, prefix_len=50, seed=2)
    prefix = few_shot.requests[0].prompt_token_ids[:50]
    assert all(r.prompt_token_ids[:50] == prefix and len(r.prompt_token_ids) > 50 for r in few_shot.requests)
    assert len({tuple(r.prompt_token_ids[50:]) for r in few_shot.requests}) == 6
    par = make_workload("parallel", 3, n=3, output_len=4)
    assert all(r.n == 3 and r.output_tokens == 12 for r in par.requests) and par.summary()["total_output_tokens"] == 36
    beam = make_workload("beam", 3, beam_width=4, output_len=4)
    assert all(r.beam_width == 4 and r.output_tokens == 4 for r in beam.requests)
    assert set(KINDS) == {"sharegpt", "alpaca", "fixed", "long-context", "shared-prefix", "parallel", "beam"}


@pytest.mark.parametrize("kw, field", [(dict(kind="x"), "workload"), (dict(num_requests=0), "num_requests"),
                                       (dict(scale=0), "scale"), (dict(rate=-1.0), "rate"),
                                       (dict(kind="fixed"), "input_len"), (dict(kind="parallel", n=1), "n must"),
                                       (dict(kind="beam", beam_width=1), "beam_width"),
                                       (dict(kind="fixed", input_len=0, output_len=2), "input_len")])
def test_workload_rejects_bad_input(kw, field):
    args = dict(kind="alpaca", num_requests=3) | kw
    with pytest.raises(ValueError, match=field):
        make_workload(**args)


def test_near_tie_tolerance_is_dtype_aware():
    assert near_tie_tolerance(torch.float32) == FLOAT32_NEAR_TIE == 1e-3
    bf16 = near_tie_tolerance(torch.bfloat16, -1.5)
    # bf16 logits are quantized at ~4e-3 to 8e-3 nats near 1-2: a tolerance below that would reject float noise
    assert bf16 > 8e-3 and bf16 == pytest.approx(4 * 2**-7 * 1.5)
    assert near_tie_tolerance(torch.float16, -0.1) == pytest.approx(4 * 2**-10)
    assert near_tie_tolerance(torch.bfloat16, -8.0) > near_tie_tolerance(torch.bfloat16, -1.0)


def test_token_check_counts_instead_of_raising():
    prompts = {"a": [5, 6], "b": [7]}
    ref = {"a": [1, 2, 3], "b": [4]}
    gaps = {}

    def gap_of(prompt, x, y):
        gaps[tuple(prompt)] = (x, y)
        return {(5, 6, 1): (-1.0, -1.0 - 5e-3)}.get(tuple(prompt))  # a bf16-sized near-tie after [5, 6, 1]

    same = check_tokens("paged", ref, {"vattention": dict(ref)}, prompts, gap_of, torch.float32)
    assert same.identical and same.mismatches == 0 and not gaps
    other = {"a": [1, 9, 3], "b": [4]}
    fp32 = check_tokens("paged", ref, {"vattention": other}, prompts, gap_of, torch.float32)
    assert fp32.mismatches == 1 and fp32.near_ties == 0 and "differ on a at output token 1" in fp32.examples[0]
    assert gaps == {(5, 6, 1): (2, 9)}  # the reference's logprobs were asked for exactly that prefix and pair
    bf16 = check_tokens("paged", ref, {"vattention": other}, prompts, gap_of, torch.bfloat16)
    assert bf16.mismatches == 0 and bf16.near_ties == 1 and not bf16.identical
    assert bf16.as_dict()["near_tie_divergences"] == 1
    missing = check_tokens("paged", ref, {"vattention": {"a": [1, 2, 3]}}, prompts, gap_of, torch.float32)
    assert missing.mismatches == 1 and "no output for b" in missing.examples[0]


def test_compare_shim_runs_both_paths_and_checks_tokens(tmp_path):
    from benchmarks import compare

    out = tmp_path / "cmp.json"
    payload = compare.main(["--preset", "tiny", "--num-requests", "4", "--scale", "0.03", "--page-sizes", "4K",
                            "--kv-layouts", "per_layer,interleaved", "--kv-memory", "4M", "--no-progress",
                            "--no-plot", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(payload["results"]))
    assert saved["command"].startswith("vattn bench throughput --engines paged,vattention")
    assert saved["token_check"]["mismatches"] == 0 and saved["token_check"]["tokens_identical"] is True
    rows = {r["engine"]: r for r in saved["results"]}
    assert list(rows) == ["paged", "vattention@4K", "vattention@4K/interleaved"]
    assert rows["vattention@4K/interleaved"]["tokens_per_unit"] < rows["vattention@4K"]["tokens_per_unit"]
    assert rows["paged"]["output_ratio"] == 1.0 and rows["paged"]["map_wait_seconds"] == 0
    total_out = saved["workload"]["total_output_tokens"]
    for r in rows.values():
        assert r["output_tokens"] == total_out and r["output_tokens_per_s"] > 0


def test_token_mismatch_still_writes_results(tmp_path, monkeypatch):
    """A mismatch fails the run only after the JSON (with the mismatch count) is on disk."""
    from vattn.bench import engines, throughput

    real = engines.run_vattn

    def corrupt_paged(spec, wl, opts):
        res = real(spec, wl, opts)
        if spec.kind == "paged":
            first = wl.requests[0].request_id
            res.tokens[first] = [t + 1 for t in res.tokens[first]]
        return res

    monkeypatch.setattr(engines, "run_vattn", corrupt_paged)
    out = tmp_path / "mm.json"
    with pytest.raises(throughput.TokenMismatchError, match="1 MISMATCH"):
        throughput.main(["--model", "tiny", "--engines", "vattention,paged", "--num-requests", "2", "--input-len",
                         "6", "--output-len", "3", "--kv-memory", "4M", "--no-progress", "--no-plot",
                         "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["token_check"]["mismatches"] == 1 and saved["token_check"]["tokens_identical"] is False


def test_benchmarks_shims_reject_bad_arguments(tmp_path):
    from benchmarks import bench_sharing, compare
    from vattn.bench import kernels

    with pytest.raises(ValueError, match="--repeats"):
        compare.main(["--repeats", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="--widths"):
        bench_sharing.main(["--preset", "tiny", "--widths", "1", "--num-requests", "1", "--kv-memory", "2M",
                            "--scale", "0.05", "--engines", "paged", "--out", str(tmp_path / "y.json")])
    with pytest.raises(ValueError, match="--heads"):
        kernels.main(["--heads", "6", "--kv-heads", "4", "--out", str(tmp_path / "z.json")])


def test_benchmarks_common_does_not_import_tests():
    import benchmarks.common as common

    assert "tests" not in open(common.__file__).read()
    assert common.results_dir("cpu").name == "cpu"


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
