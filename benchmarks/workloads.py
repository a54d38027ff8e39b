"""Synthetic, seeded request workloads whose length distributions follow published dataset statistics.

Published means (vLLM paper, SOSP'23, Fig. 11): ShareGPT 161 prompt / 338 output tokens, Alpaca 19 / 58. We draw
lengths from log-normal distributions with those means (ShareGPT's are long-tailed, Alpaca's narrower), clip them
to the ranges vLLM's own benchmark keeps (prompt <= 1024, prompt + output <= 2048), and scale everything by
`scale` so a CPU can run it. Token ids are random (never BOS/EOS): the model is random too, so only lengths matter.
Arrivals are all at t=0 (offline throughput) or a Poisson process of `rate` requests per second.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LengthDist:
    name: str
    prompt_mean: float
    output_mean: float
    prompt_sigma: float  # of the underlying normal (log-normal shape)
    output_sigma: float
    max_prompt: int = 1024
    max_total: int = 2048


DISTS = {
    "sharegpt": LengthDist("sharegpt", 161, 338, 1.0, 0.9),
    "alpaca": LengthDist("alpaca", 19, 58, 0.5, 0.8),
}


@dataclass
class BenchRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival: float = 0.0  # seconds after the start


@dataclass
class Workload:
    dist: str
    scale: float
    seed: int
    rate: float | None  # requests/s (Poisson) or None (all at once)
    requests: list[BenchRequest] = field(default_factory=list)

    @property
    def max_total_len(self) -> int:
        return max(len(r.prompt_token_ids) + r.max_tokens for r in self.requests)

    def summary(self) -> dict:
        p = [len(r.prompt_token_ids) for r in self.requests]
        o = [r.max_tokens for r in self.requests]
        return {"dist": self.dist, "scale": self.scale, "seed": self.seed, "num_requests": len(self.requests),
                "arrival": "offline" if self.rate is None else f"poisson {self.rate}/s",
                "prompt_mean": sum(p) / len(p), "prompt_max": max(p), "output_mean": sum(o) / len(o),
                "output_max": max(o), "total_output_tokens": sum(o)}


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)  # E[X] = mean


def make_workload(dist: str, num_requests: int, scale: float = 1.0, seed: int = 0, vocab_size: int = 512,
                  rate: float | None = None, first_id: int = 2) -> Workload:
    """`num_requests` requests with `dist`'s lengths times `scale`; token ids in [first_id, vocab_size)."""
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {sorted(DISTS)}, got {dist!r}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if vocab_size <= first_id:
        raise ValueError(f"vocab_size must exceed first_id={first_id}, got {vocab_size}")
    d = DISTS[dist]
    rng = random.Random(seed)
    max_prompt = max(2, int(d.max_prompt * scale))
    max_total = max(3, int(d.max_total * scale))
    wl = Workload(dist, scale, seed, rate)
    t = 0.0
    for i in range(num_requests):
        plen = min(max_prompt, max(2, round(_lognormal(rng, d.prompt_mean * scale, d.prompt_sigma))))
        olen = min(max_total - plen, max(1, round(_lognormal(rng, d.output_mean * scale, d.output_sigma))))
        ids = [rng.randrange(first_id, vocab_size) for _ in range(plen)]
        if rate is not None:
            t += rng.expovariate(rate)
        wl.requests.append(BenchRequest(f"{dist}-{i}", ids, olen, t))
    return wl
