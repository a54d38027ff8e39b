"""vattn on Ray Serve: N replicas of `vattn serve`'s app behind Ray's router (`pip install "vattn[ray]"`).

Each replica is a Ray actor that owns one engine and serves the FastAPI app of `vattn.server.build_app` over it
(`serve.ingress`), so the routes, streaming, errors and limits are `vattn serve`'s own. Ray's HTTP proxy takes the
requests and its router sends each one to a replica (the less busy of two picked at random). The engine runs in
its own process under the replica actor by default (`engine_process`, as in `vattn serve`): the actor's event loop
does HTTP, SSE and tokenization while a step computes in the child; with `engine_process=False` it runs on a
thread of the actor. Every response carries the answering replica's id in the `x-vattn-replica` header (the
replica actor's name, in Ray's "serve" namespace).

Three entries, one set of options (every EngineConfig and ServerConfig field by name, plus the deployment's
own: `num_replicas`, `served_model_name`, `num_cpus_per_replica`, `num_gpus_per_replica`, `max_ongoing_requests`):

    serve run vattn.server.ray_serve:app_builder model=/path/to/model num_replicas=2 max_num_seqs=32
    vattn serve-ray --replicas 2 --model /path/to/model --port 8000
    deploy(model="/path/to/model", num_replicas=2, port=8000)     # or serve.run(build_app(...))
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import ray
from packaging.version import Version
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from vattn.config import EngineConfig
from vattn.server.config import ServerConfig

log = logging.getLogger("vattn.server")

MIN_RAY = "2.60"  # serve.ingress() with `__serve_build_asgi_app__`: each replica builds its app over its engine
if Version(ray.__version__) < Version(MIN_RAY):
    raise ImportError(f"vattn.server.ray_serve needs ray[serve]>={MIN_RAY}, found ray {ray.__version__}: "
                      "pip install 'vattn[ray]'")

REPLICA_HEADER = "x-vattn-replica"
DEPLOYMENT_NAME = "vattn"
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
_SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}


class _ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that produced it."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()  # late-bound: the app is built in each replica, over that replica's engine
class VattnReplica:
    """One replica: one engine and the FastAPI app of `vattn serve` over it.

    The engine starts in the constructor (in its own process unless `server_config.engine_process` is off); the
    app's lifespan starts the engine thread when Ray starts the replica and closes the engine (its KV cache, its
    process) when Ray stops it. Ray's health check asks `check_health`: a replica whose engine is gone is
    replaced."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig,
                 served_model_name: str | None = None):
        from vattn.engine import LLMEngine
        from vattn.engine_process import EngineProcess

        if not logging.getLogger().handlers:  # the replica's log file (Ray redirects the actor's stderr)
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._server_config = server_config
        self._served_model_name = served_model_name
        self._engine = (EngineProcess if server_config.engine_process else LLMEngine)(engine_config)
        self._replica = serve.get_replica_context().replica_id.to_full_id_str()
        self._app = None

    def __serve_build_asgi_app__(self):
        from vattn.server.app import build_app as build_fastapi_app

        self._app = build_fastapi_app(self._engine, self._served_model_name, self._server_config)
        self._app.add_middleware(_ReplicaHeader, replica=self._replica)
        return self._app

    def check_health(self) -> None:
        """Raise (so Ray replaces this replica) when the engine thread or the engine process is gone."""
        engine = self._app.state.ctx.engine if self._app is not None else None
        if engine is not None and engine.dead is not None:
            raise RuntimeError(f"the engine thread crashed: {engine.dead!r}")
        is_alive = getattr(self._engine, "is_alive", None)
        if is_alive is not None and not is_alive():
            raise RuntimeError("the engine process is gone")


def build_app(num_replicas: int = 1, served_model_name: str | None = None, num_cpus_per_replica: float = 1.0,
              num_gpus_per_replica: float | None = None, max_ongoing_requests: int | None = None,
              **options: Any) -> Application:
    """The Ray Serve application: `num_replicas` replicas of vattn, ready for `serve.run`.

    `options` are EngineConfig fields (model, kv_cache, max_num_seqs, ...) and ServerConfig fields (api_key,
    max_waiting_requests, engine_process, ...) by name; both are validated here, before anything starts
    (ValueError / FileNotFoundError naming the problem). Per replica: `num_cpus_per_replica` Ray CPUs;
    `num_gpus_per_replica` GPUs (None: 1 when this machine has CUDA and `device` is not cpu, else 0; Ray gives
    each replica its own GPU through CUDA_VISIBLE_DEVICES); `max_ongoing_requests` requests in flight before Ray
    queues more in its proxy (None: max_num_seqs + max_waiting_requests, what one replica admits anyway; Ray's
    own default of 5 would cap a replica's batch at 5). Ray's graceful shutdown gives running requests
    `shutdown_timeout` seconds, as `vattn serve` does.
    """
    unknown = sorted(set(options) - _ENGINE_FIELDS - _SERVER_FIELDS)
    if unknown:
        raise ValueError(f"unknown vattn option(s) {unknown}; valid: num_replicas, served_model_name, "
                         f"num_cpus_per_replica, num_gpus_per_replica, max_ongoing_requests, and the fields of "
                         f"EngineConfig {sorted(_ENGINE_FIELDS)} and ServerConfig {sorted(_SERVER_FIELDS)}")
    if options.get("model") is None:
        options.pop("model", None)  # the bundled model
    engine_config = EngineConfig(**{k: v for k, v in options.items() if k in _ENGINE_FIELDS})
    server_config = ServerConfig(**{k: v for k, v in options.items() if k in _SERVER_FIELDS})
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    if num_cpus_per_replica < 0:
        raise ValueError(f"num_cpus_per_replica must be >= 0, got {num_cpus_per_replica}")
    if num_gpus_per_replica is None:
        import torch

        num_gpus_per_replica = 1 if engine_config.device != "cpu" and torch.cuda.is_available() else 0
    if num_gpus_per_replica < 0:
        raise ValueError(f"num_gpus_per_replica must be >= 0, got {num_gpus_per_replica}")
    if max_ongoing_requests is None:
        max_ongoing_requests = engine_config.max_num_seqs + (server_config.max_waiting_requests or 1024)
    if max_ongoing_requests < 1:
        raise ValueError(f"max_ongoing_requests must be >= 1, got {max_ongoing_requests}")
    deployment = VattnReplica.options(
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica},
        max_ongoing_requests=max_ongoing_requests,
        graceful_shutdown_timeout_s=server_config.shutdown_timeout,
    )
    return deployment.bind(engine_config, server_config, served_model_name)


class _ArgsError(ValueError):
    """A `serve run` build argument that does not parse."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of exiting: Ray shows the message
        raise _ArgsError(message)


def _builder_parser() -> _Parser:
    from vattn.cli import add_engine_args, add_replica_args, add_server_args

    parser = _Parser(prog="vattn.server.ray_serve:app_builder", add_help=False)
    parser.add_argument("--served-model-name", default=None)
    add_replica_args(parser)
    add_server_args(parser)
    add_engine_args(parser)
    return parser


def _builder_argv(args: Mapping[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """{"max_num_seqs": "8", "enable_prefix_caching": "false"} -> ["--max-num-seqs", "8", "--no-enable-..."]."""
    actions = {a.dest: a for a in parser._actions}
    aliases = {"replicas": "num_replicas"}
    argv = []
    for key, value in args.items():
        dest = aliases.get(key, key)
        action = actions.get(dest)
        if action is None or not action.option_strings:
            raise _ArgsError(f"unknown build argument {key!r}; valid: "
                             + ", ".join(sorted(a.dest for a in parser._actions if a.option_strings)))
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            text = str(value).strip().lower()
            if text not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                raise _ArgsError(f"{key} must be true or false, got {value!r}")
            argv.append(flag if text in ("true", "1", "yes", "on") else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def app_builder(args: Mapping[str, Any] | None = None) -> Application:
    """The `serve run` entry: `serve run vattn.server.ray_serve:app_builder model=DIR num_replicas=2 ...`.

    Build arguments are the options of `build_app` by name (`replicas` is an alias of `num_replicas`), given as
    strings (`key=value` on the command line) or typed values (a Serve config file's `args:`); sizes take suffixes
    (`kv_cache_memory=2G`) and booleans true/false, as the `vattn serve` flags do."""
    parser = _builder_parser()
    ns = parser.parse_args(_builder_argv(args or {}, parser))
    return build_app(**vars(ns))


def deploy(host: str = "127.0.0.1", port: int = 8000, name: str = DEPLOYMENT_NAME, **build_args: Any
           ) -> DeploymentHandle:
    """Start Ray Serve's HTTP proxy on host:port (connecting to, or starting, Ray as `ray.init()` does) and run
    `build_app(**build_args)` at route "/" under the application name `name`; returns once every replica is up.
    `serve.shutdown()` stops it."""
    app = build_app(**build_args)  # validates before Ray starts
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix="/")
