"""Two vattn replicas behind Ray Serve on this machine, queried with the OpenAI client.

    pip install "vattn[ray]"
    python examples/ray_replicas.py                       # the bundled model
    python examples/ray_replicas.py --model /path/to/hf-model-dir --replicas 4

Starts a private Ray instance, deploys the replicas (each loads its own engine), sends a few completions and a
streamed chat, prints which replica answered each (the x-vattn-replica header), then shuts everything down.
"""

from __future__ import annotations

import argparse
import os

import openai
import ray
from ray import serve

from vattn.server.ray_serve import REPLICA_HEADER, deploy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Hugging Face model directory (default: the bundled model)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()

    ray.init(address="local", include_dashboard=False)  # `ray.init(address="auto")` joins a `ray start` cluster
    try:
        deploy(port=args.port, model=args.model, num_replicas=args.replicas, num_cpus_per_replica=0.5,
               max_num_seqs=8, kv_cache_memory=64 << 20)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none")
        name = client.models.list().data[0].id
        for i in range(4):
            raw = client.completions.with_raw_response.create(model=name, prompt='The "assert" statement',
                                                              max_tokens=16, temperature=0)
            text = raw.parse().choices[0].text
            print(f"completion {i} from {raw.headers[REPLICA_HEADER]}: {text!r}")
        stream = client.chat.completions.create(model=name, stream=True, max_tokens=24,
                                                messages=[{"role": "user", "content": "What does a for loop do?"}])
        print("chat:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
