"""The `vattn` command: `vattn serve` (OpenAI-compatible server), `vattn generate` (offline), `vattn bench`,
`vattn serve-ray` (replicas of the server on Ray Serve; needs `vattn[ray]`).

Every EngineConfig field is a flag, generated from the dataclass: `--max-num-seqs 32`, `--kv-cache paged`,
`--no-enable-prefix-caching`; sizes in bytes take suffixes (`--kv-cache-memory 2G`, `--page-size 64K`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
import signal
import sys
import time
import types
import typing

from vattn import config as config_module
from vattn.config import EngineConfig
from vattn.server.config import ServerConfig

# bytes; accept 64K, 2M, 1G, 1.5G, 4096
SIZE_FIELDS = ("kv_cache_memory", "page_size", "max_request_body_bytes", "chat_template_memory")
CHOICES = {"kv_cache": config_module.KV_CACHE_KINDS, "dtype": config_module.DTYPES,
           "preemption_mode": config_module.PREEMPTION_MODES, "kv_layout": config_module.KV_LAYOUTS,
           "attention_kernel": sorted({k for ks in config_module.ATTENTION_KERNELS.values() for k in ks})}
HELP = {  # for fields whose line in config.py carries no comment
    "model": "model directory (Hugging Face layout: config.json, safetensors, tokenizer); default: the bundled model",
    "max_num_seqs": "most sequences in one batch (rows of the virtual KV tensors)",
    "max_model_len": "context length (prompt + output) of one sequence; None: the model's max_position_embeddings, "
                     "capped at 4096",
    "max_num_batched_tokens": "most tokens (prefill + decode) computed in one engine step",
    "enable_prefix_caching": "reuse the KV cache of a shared prompt prefix",
    "seed": "seed of the engine's default random generator",
    "tensor_parallel_size": "ranks the model is split over (tensor parallelism): rank 0 runs the engine and starts "
                            "N-1 workers, one GPU each on CUDA, at most one per core on CPU; kv-cache-memory is per "
                            "rank",
    "attention_kernel": "attention kernel: auto, or for vattention "
                        + "|".join(config_module.ATTENTION_KERNELS["vattention"][1:])
                        + ", for paged " + "|".join(config_module.ATTENTION_KERNELS["paged"][1:]),
}
_CLOSE_TIMEOUT = 5.0  # seconds, after the drain, for responses already ended to reach their clients
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class SizeError(argparse.ArgumentTypeError, ValueError):
    """A size that does not parse: argparse shows its message; library callers can catch ValueError."""


def parse_size(text: str) -> int:
    """'4096' -> 4096, '64K' -> 65536, '2M', '1.5G', '1GiB', '512MB' (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if not m:
        raise SizeError(f"not a size in bytes: {text!r} (examples: 4096, 64K, 2M, 1G)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value != int(value):
        raise SizeError(f"not a whole number of bytes: {text!r}")
    return int(value)


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing `# ...` comment of each field line in the dataclass's source: our --help text."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _base_type(hint):
    """int | None -> int; anything else unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, with its type, default, choices and help."""
    _add_dataclass_args(parser.add_argument_group("engine (EngineConfig)"), EngineConfig)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field: request bounds, locking, shutdown."""
    _add_dataclass_args(parser.add_argument_group("server limits and locking (ServerConfig)"), ServerConfig)


def _add_dataclass_args(group, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = HELP.get(f.name) or comments.get(f.name) or f"{cls.__name__}.{f.name}"
        kind = _base_type(hints[f.name])
        help_text = f"{help_text} (default: {default})".replace("%", "%%")
        kw: dict = dict(dest=f.name, default=default, help=help_text)
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name in SIZE_FIELDS:
            kw.update(type=parse_size, metavar="BYTES")
        else:
            kw["type"] = kind
            if f.name in CHOICES:
                kw["choices"] = list(CHOICES[f.name])
        group.add_argument(flag, **kw)


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    """The Ray Serve deployment's own options (`vattn serve-ray`, vattn.server.ray_serve.app_builder)."""
    group = parser.add_argument_group("replicas (Ray Serve)")
    group.add_argument("--replicas", "--num-replicas", dest="num_replicas", type=int, default=1,
                       help="engine replicas behind Ray's router, each with its own engine (default: 1)")
    group.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                       help="Ray CPUs reserved per replica (default: 1)")
    group.add_argument("--num-gpus-per-replica", type=float, default=None,
                       help="GPUs per replica (default: 1 when CUDA is available and --device is not cpu, else 0)")
    group.add_argument("--max-ongoing-requests", type=int, default=None,
                       help="requests in flight per replica before Ray's proxy queues more "
                            "(default: max_num_seqs + max_waiting_requests)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Serve a model over an OpenAI-compatible HTTP API "
                                       "(/v1/completions, /v1/chat/completions, /v1/models, /tokenize, "
                                       "/detokenize, /health, /metrics).")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: 8000)")
    serve.add_argument("--served-model-name", default=None,
                       help="model name clients must send and /v1/models lists (default: the model dir's basename)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="logging level; info logs one line per finished request (default: info)")
    add_server_args(serve)
    add_engine_args(serve)

    ray = sub.add_parser("serve-ray", help="serve N replicas of the server behind Ray Serve (needs vattn[ray])",
                         description="Start (or join, --ray-address) a Ray cluster and serve the model from "
                                     "--replicas engine replicas behind Ray Serve's HTTP proxy on --host:--port, "
                                     "with the routes of `vattn serve`. Ctrl-C / SIGTERM stops it.")
    ray.add_argument("--host", default="127.0.0.1", help="address of Ray's HTTP proxy (default: 127.0.0.1)")
    ray.add_argument("--port", type=int, default=8000, help="port of Ray's HTTP proxy (default: 8000)")
    ray.add_argument("--ray-address", default="local",
                     help="Ray cluster to join ('auto': the one `ray start` began on this machine, or "
                          "ray://host:port); default 'local': start a private one that stops with this command")
    ray.add_argument("--served-model-name", default=None,
                     help="model name clients must send and /v1/models lists (default: the model dir's basename)")
    ray.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="logging level of this command (default: info)")
    add_replica_args(ray)
    add_server_args(ray)
    add_engine_args(ray)

    gen = sub.add_parser("generate", help="generate text for a prompt, offline, and print it",
                         description="Load the model, generate for each --prompt, print the text.")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    gen.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampler (default: none)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    add_engine_args(gen)

    # `vattn bench <mode> ...` is parsed by vattn.bench (main() hands it over before argparse sees it); listed here
    # so that `vattn --help` shows it
    sub.add_parser("bench", help="the comparative benchmark harness: throughput, serve, memory, kernels, roofline "
                                 "(vattn bench --help)", add_help=False)
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vattn.engine import LLMEngine
    from vattn.engine_process import EngineProcess
    from vattn.server import build_app

    server_cfg = server_config(args)
    engine = (EngineProcess if server_cfg.engine_process else LLMEngine)(engine_config(args))
    app = build_app(engine, args.served_model_name, server_cfg)
    async_engine = app.state.ctx.engine

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: stop accepting, give running requests `shutdown_timeout` seconds, end the rest
        with an OpenAI-style error (a stream: an error event and [DONE]), then let uvicorn close the rest."""

        async def shutdown(self, sockets=None):
            for listener in self.servers:
                listener.close()
            failed = await async_engine.drain(server_cfg.shutdown_timeout)
            if failed:
                logging.getLogger("vattn.server").warning(
                    "shutdown: %d requests did not finish within %.1fs and were ended with an error",
                    failed, server_cfg.shutdown_timeout)
            await super().shutdown(sockets)

    server = DrainingServer(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
        access_log=args.log_level == "debug", timeout_graceful_shutdown=_CLOSE_TIMEOUT))
    # uvicorn re-raises a caught SIGINT/SIGTERM once it has shut down, through the handler that was
    # installed before it started: make that one a no-op, so a requested shutdown exits 0.
    received = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    # an engine that cannot go on (a tensor-parallel worker died) shuts the server down, which then exits 1
    async_engine.on_fatal = lambda exc: setattr(server, "should_exit", True)
    try:
        server.run()
    finally:
        async_engine.shutdown()  # no-op when the lifespan already did it
    if async_engine.dead is not None and getattr(async_engine.dead, "fatal", False):
        print(f"vattn serve: error: the engine stopped: {async_engine.dead}", file=sys.stderr)
        return 1
    if received:
        logging.getLogger("vattn.server").info("shut down on %s", signal.Signals(received[0]).name)
    return 0 if server.started or received else 1


def serve_ray(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve as ray_serve

        from vattn.server.ray_serve import deploy
    except ImportError as exc:
        raise ValueError(f"Ray Serve is not installed ({exc}): pip install 'vattn[ray]'") from exc

    build_args = dict(num_replicas=args.num_replicas, served_model_name=args.served_model_name,
                      num_cpus_per_replica=args.num_cpus_per_replica,
                      num_gpus_per_replica=args.num_gpus_per_replica,
                      max_ongoing_requests=args.max_ongoing_requests,
                      **dataclasses.asdict(engine_config(args)), **dataclasses.asdict(server_config(args)))
    # validate every option before Ray starts (a bad one is a clear error, not a replica that keeps failing)
    from vattn.server.ray_serve import build_app

    build_app(**build_args)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    ray.init(address=args.ray_address, logging_level=args.log_level.upper())
    try:
        deploy(host=args.host, port=args.port, **build_args)
        logging.getLogger("vattn.server").info("serving %d replicas on http://%s:%d (Ray Serve)",
                                               args.num_replicas, args.host, args.port)
        while not stop:
            time.sleep(0.2)
    finally:
        ray_serve.shutdown()  # Ray's graceful shutdown: running requests get --shutdown-timeout seconds
        ray.shutdown()
    return 0


def generate(args: argparse.Namespace) -> int:
    from vattn.llm import LLM
    from vattn.sampling_params import SamplingParams

    llm = LLM(**dataclasses.asdict(engine_config(args)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.sampling_seed)
    with llm:
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
        else:
            outs = llm.generate(args.prompt, params, use_tqdm=False)
    for out in outs:
        print(out.outputs[0].text, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from vattn.bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve-ray":
            return serve_ray(args)
        return serve(args) if args.command == "serve" else generate(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vattn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
