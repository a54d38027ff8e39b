"""Seeded, reproducible request workloads. The same (kind, sizes, seed, vocabulary) gives the same requests.

Kinds:
- `sharegpt`, `alpaca`: lengths drawn from log-normal distributions with the published means (vLLM paper, SOSP'23:
  ShareGPT 161 prompt / 338 output tokens, Alpaca 19 / 58), clipped like vLLM's benchmark (prompt <= 1024,
  prompt + output <= 2048), all multiplied by `scale` so a CPU can run them.
- `fixed`: every request `input_len` prompt tokens and `output_len` output tokens (vLLM's "random" dataset with no
  range).
- `long-context`: prompts between 3/4 and all of `input_len` tokens (default 2048 x scale), outputs Alpaca-like.
- `shared-prefix`: few-shot style: one common prefix of `prefix_len` tokens (default 256 x scale), then an
  Alpaca-like question of its own; Alpaca-like outputs. Prefix caching and sharing show here.
- `parallel`: Alpaca-like requests, each asking for `n` samples (temperature 1, seeded).
- `beam`: Alpaca-like requests, each a beam search of width `beam_width`.
Token ids are random, never special tokens (the models are random too, so only lengths matter; the tokenizer is
real, so the text of any output decodes). Arrivals are all at t=0 (offline) or a Poisson process of `rate`/s.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

KINDS = ("sharegpt", "alpaca", "fixed", "long-context", "shared-prefix", "parallel", "beam")


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
    n: int = 1  # parallel samples (all forked from one prompt)
    beam_width: int = 0  # > 0: beam search of this width

    @property
    def sequences(self) -> int:
        return self.beam_width or self.n

    @property
    def output_tokens(self) -> int:
        """Output tokens the request produces with ignore_eos: every sample (beam search returns the best one)."""
        return self.max_tokens * (1 if self.beam_width else self.n)


@dataclass
class Workload:
    kind: str
    scale: float
    seed: int
    rate: float | None  # requests/s (Poisson) or None (all at once)
    requests: list[BenchRequest] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    @property
    def max_total_len(self) -> int:
        return max(len(r.prompt_token_ids) + r.max_tokens for r in self.requests)

    def summary(self) -> dict:
        p = [len(r.prompt_token_ids) for r in self.requests]
        o = [r.max_tokens for r in self.requests]
        return {"kind": self.kind, "scale": self.scale, "seed": self.seed, "num_requests": len(self.requests),
                "arrival": "offline" if self.rate is None else f"poisson {self.rate}/s", **self.params,
                "prompt_mean": sum(p) / len(p), "prompt_max": max(p), "output_mean": sum(o) / len(o),
                "output_max": max(o), "total_prompt_tokens": sum(p),
                "total_output_tokens": sum(r.output_tokens for r in self.requests)}

    def describe(self) -> str:
        s = self.summary()
        extra = "".join(f", {k} {self.params[k]}" for k in sorted(self.params))
        return (f"{s['num_requests']} {self.kind} requests (x{self.scale}{extra}, {s['arrival']}, seed {self.seed}): "
                f"prompt mean {s['prompt_mean']:.1f} max {s['prompt_max']}, output mean {s['output_mean']:.1f} "
                f"max {s['output_max']}")


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)  # E[X] = mean


def _lengths(rng: random.Random, dist: str, scale: float) -> tuple[int, int]:
    d = DISTS[dist]
    max_prompt, max_total = max(2, int(d.max_prompt * scale)), max(3, int(d.max_total * scale))
    plen = min(max_prompt, max(2, round(_lognormal(rng, d.prompt_mean * scale, d.prompt_sigma))))
    olen = min(max_total - plen, max(1, round(_lognormal(rng, d.output_mean * scale, d.output_sigma))))
    return plen, olen


def make_workload(kind: str, num_requests: int, scale: float = 1.0, seed: int = 0, vocab_size: int = 512,
                  rate: float | None = None, first_id: int = 3, input_len: int | None = None,
                  output_len: int | None = None, prefix_len: int | None = None, n: int = 4,
                  beam_width: int = 4) -> Workload:
    """`num_requests` requests of `kind` (see the module doc); token ids in [first_id, vocab_size)."""
    if kind not in KINDS:
        raise ValueError(f"workload must be one of {', '.join(KINDS)}, got {kind!r}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if vocab_size <= first_id:
        raise ValueError(f"vocab_size must exceed first_id={first_id}, got {vocab_size}")
    for name, v in (("input_len", input_len), ("output_len", output_len), ("prefix_len", prefix_len)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if kind == "fixed" and (input_len is None or output_len is None):
        raise ValueError("the fixed workload needs input_len and output_len (--input-len, --output-len)")
    if kind == "parallel" and n < 2:
        raise ValueError(f"n must be >= 2 for the parallel workload, got {n}")
    if kind == "beam" and beam_width < 2:
        raise ValueError(f"beam_width must be >= 2 for the beam workload, got {beam_width}")
    rng = random.Random(seed)
    tokens = lambda k: [rng.randrange(first_id, vocab_size) for _ in range(k)]  # noqa: E731
    params: dict = {}
    prefix: list[int] = []
    if kind == "fixed":
        params = {"input_len": input_len, "output_len": output_len}
    elif kind == "long-context":
        input_len = input_len or max(8, int(2048 * scale))
        params = {"input_len": input_len}
    elif kind == "shared-prefix":
        prefix_len = prefix_len or max(4, int(256 * scale))
        params = {"prefix_len": prefix_len}
        prefix = tokens(prefix_len)
    elif kind == "parallel":
        params = {"n": n}
    elif kind == "beam":
        params = {"beam_width": beam_width}
    wl = Workload(kind, scale, seed, rate, params=params)
    t = 0.0
    for i in range(num_requests):
        if kind == "fixed":
            plen, olen = input_len, output_len
        elif kind == "sharegpt":
            plen, olen = _lengths(rng, "sharegpt", scale)
        elif kind == "long-context":
            plen = rng.randint(max(1, 3 * input_len // 4), input_len)
            olen = output_len or _lengths(rng, "alpaca", scale)[1]
        else:  # alpaca-like: alpaca, shared-prefix (question after the prefix), parallel, beam
            plen, olen = _lengths(rng, "alpaca", scale)
            if output_len:
                olen = output_len
        ids = prefix + tokens(plen)
        if rate is not None:
            t += rng.expovariate(rate)
        wl.requests.append(BenchRequest(f"{kind}-{i}", ids, olen, t, n=n if kind == "parallel" else 1,
                                        beam_width=beam_width if kind == "beam" else 0))
    return wl


def first_regular_id(config: dict) -> int:
    """The lowest token id above every special id the model's config names (bos, eos, pad)."""
    ids = []
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = config.get(k)
        ids += v if isinstance(v, list) else [v] if v is not None else []
    return max(ids, default=-1) + 1


def workload_from_args(args, config: dict) -> Workload:
    """The workload the shared --workload/--num-requests/... flags describe, for the model of `config`."""
    return make_workload(args.workload, args.num_requests, args.scale, args.seed, int(config["vocab_size"]),
                         getattr(args, "rate", None), first_regular_id(config), args.input_len, args.output_len,
                         args.prefix_len, args.n, args.beam_width)
