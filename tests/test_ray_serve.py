"""vattn on Ray Serve, end to end: a private local Ray instance, 2 replicas of a tiny model, real HTTP through
Ray's proxy on 127.0.0.1.

One module-scoped deployment serves every test, in file order: routes and streaming (checked against the offline
engine), requests spread over both replicas, bad inputs, one replica killed mid-stream, then shutdown (no process
of the Ray instance, engines included, outlives it). Every process the instance starts carries a marker in its
environment, which is how the last test finds them.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'vattn[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'vattn[ray]')")

from tests.server_utils import free_port, wait_for  # noqa: E402
from vattn.server.ray_serve import REPLICA_HEADER, app_builder, build_app, deploy  # noqa: E402

MARKER = "VATTN_RAY_TEST"
PROMPT = 'The "assert" statement'
GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}


def marked_pids(token: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries MARKER=token (this one excluded)."""
    needle = f"{MARKER}={token}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Cluster:
    """A private Ray instance (2 logical CPUs, no dashboard, its own temp dir) running vattn with 2 replicas."""

    def __init__(self, model_dir: str):
        self.token = uuid.uuid4().hex
        self.model_dir = model_dir
        self.model_name = os.path.basename(os.path.normpath(model_dir))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="vattn-ray-", dir="/tmp")  # short: Ray puts unix sockets there
        os.environ[MARKER] = self.token  # inherited by every process Ray starts, and theirs
        try:
            # a small object store: nothing large crosses Ray here, and CI containers have small /dev/shm
            ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=self.temp_dir,
                     object_store_memory=128 << 20, log_to_driver=False, configure_logging=False)
        finally:
            del os.environ[MARKER]
        self.up = True
        deploy(port=self.port, model=model_dir, num_replicas=2, num_cpus_per_replica=0.5, device="cpu",
               num_threads=1, max_num_seqs=8, kv_cache_memory=16 << 20)

    def replica_states(self) -> dict[str, int]:
        return dict(serve.status().applications["vattn"].deployments["vattn"].replica_states)

    def shutdown(self) -> None:
        if self.up:
            self.up = False
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_model_root):
    from tests.tiny_models import get_tiny_model

    c = Cluster(str(get_tiny_model("llama", tiny_model_root)))
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    import openai

    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=60)


def sse(lines) -> list:
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


# ---- the deployment ---------------------------------------------------------------------------------


def test_completions_and_chat_through_ray_match_the_offline_engine(cluster, client):
    """The replicas answer vattn's routes as `vattn serve` does: greedy text equal to the offline engine's, the
    same text streamed, chat streamed and not."""
    from vattn import LLM, SamplingParams

    with LLM(model=cluster.model_dir, device="cpu", max_num_seqs=8, kv_cache_memory=16 << 20) as llm:
        expected = llm.generate([PROMPT], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text

    assert [m.id for m in client.models.list().data] == [cluster.model_name]
    extra = {"ignore_eos": True}
    out = client.completions.create(model=cluster.model_name, prompt=PROMPT, temperature=0, max_tokens=12,
                                    extra_body=extra)
    assert out.choices[0].text == expected and out.usage.completion_tokens == 12
    stream = client.completions.create(model=cluster.model_name, prompt=PROMPT, temperature=0, max_tokens=12,
                                       extra_body=extra, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected

    messages = [{"role": "user", "content": "What does a for loop do?"}]
    chat = client.chat.completions.create(model=cluster.model_name, messages=messages, temperature=0,
                                          max_tokens=10, extra_body=extra)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 10
    streamed = client.chat.completions.create(model=cluster.model_name, messages=messages, temperature=0,
                                              max_tokens=10, extra_body=extra, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content


def test_requests_spread_over_both_replicas(cluster):
    """Concurrent requests land on both replicas (the response header names the replica), and both give the
    same greedy text."""
    body = {"model": cluster.model_name, "prompt": PROMPT, **GREEDY}

    async def burst():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as http:
            return await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(16)])

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 16
    replicas = {r.headers[REPLICA_HEADER] for r in responses}
    assert len(replicas) == 2, replicas
    assert all(r.startswith("SERVE_REPLICA::vattn#vattn#") for r in replicas)
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1
    assert cluster.replica_states() == {"RUNNING": 2}


def test_bad_inputs_get_openai_errors_through_ray(cluster):
    def post(body, **kw):
        return httpx.post(f"{cluster.url}/v1/completions", timeout=60, **({"json": body} | kw))

    r = post({"model": cluster.model_name, "prompt": PROMPT, "max_tokens": -1})
    assert r.status_code == 400 and REPLICA_HEADER in r.headers
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "max_tokens" and "max_tokens" in err["message"]
    r = post({"model": cluster.model_name, "prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"  # refused before any stream
    r = post(None, content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post({"model": "no-such-model", "prompt": PROMPT})
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]


def test_killed_replica_others_keep_answering(cluster):
    """ray.kill on the replica that serves a stream, mid-stream: that stream ends early without [DONE] (Ray's
    proxy loses the replica; the client sees the response cut short), the replica's engine process exits with it,
    and every request after the kill is answered by the surviving replica."""
    body = {"model": cluster.model_name, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        victim = r.headers[REPLICA_HEADER]
        actor = ray.get_actor(victim, namespace="serve")
        actor_pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))
        engines = [p for p in children(actor_pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        assert len(engines) == 1, engines  # the replica's engine process
        lines = r.iter_lines()
        first = [next(lines) for _ in range(6)]  # the stream is under way
        ray.kill(actor)
        rest = []
        with pytest.raises(httpx.HTTPError):  # the proxy cuts the response off (no [DONE], no error event)
            for line in lines:
                rest.append(line)
    events = sse(first + rest)
    assert "[DONE]" not in events and 0 < len(events) < 400
    wait_for(lambda: not alive(engines[0]), 15, "the killed replica's engine process to exit")

    survivors = set()
    for _ in range(6):
        r = httpx.post(f"{cluster.url}/v1/completions", json={**body, "max_tokens": 4, "stream": False}, timeout=60)
        assert r.status_code == 200, r.text
        survivors.add(r.headers[REPLICA_HEADER])
    assert victim not in survivors


def test_shutdown_leaves_no_process(cluster):
    """serve.shutdown stops the replicas (their engines close with them); ray.shutdown stops the rest."""
    assert marked_pids(cluster.token), "the marker did not reach Ray's processes"
    cluster.shutdown()
    left = {}

    def none_left():
        left.clear()
        left.update(marked_pids(cluster.token))
        return not left

    wait_for(none_left, 30, f"Ray's processes to exit; left: {left}")


# ---- the entries, without Ray running -----------------------------------------------------------------


def test_builder_args_parse_like_the_cli(tiny_model):
    model = tiny_model("llama")
    app = app_builder({"model": model, "replicas": "3", "max_num_seqs": "8", "kv_cache_memory": "16M",
                       "enable_prefix_caching": "false", "engine_process": False, "num_cpus_per_replica": "0.5"})
    bound = app._bound_deployment
    engine_config, server_config, served = bound.init_args
    assert bound.num_replicas == 3
    assert bound.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0}
    assert (engine_config.max_num_seqs, engine_config.kv_cache_memory) == (8, 16 << 20)
    assert engine_config.enable_prefix_caching is False and server_config.engine_process is False
    assert bound.max_ongoing_requests == 8 + server_config.max_waiting_requests and served is None


@pytest.mark.parametrize("args, message", [
    ({"max_num_seqs": "many"}, "max-num-seqs"),
    ({"kv_cache_memory": "lots"}, "not a size"),
    ({"kv_cache": "flat"}, "invalid choice"),
    ({"enable_prefix_caching": "maybe"}, "true or false"),
    ({"max_num_seq": "8"}, "unknown build argument 'max_num_seq'"),
    ({"num_replicas": "0"}, "num_replicas must be an integer >= 1"),
    ({"max_num_seqs": "0"}, "max_num_seqs must be >= 1"),
    ({"model": "/no/such/dir"}, "model directory not found"),
])
def test_bad_builder_args_are_named(args, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        app_builder(args)


def test_build_app_refuses_unknown_options():
    with pytest.raises(ValueError, match="unknown vattn option"):
        build_app(num_replica=2)


def test_serve_ray_cli_refuses_bad_options_before_starting_ray(capsys):
    from vattn.cli import main

    assert main(["serve-ray", "--replicas", "0"]) == 2
    assert "num_replicas must be an integer >= 1" in capsys.readouterr().err
    assert not ray.is_initialized()
