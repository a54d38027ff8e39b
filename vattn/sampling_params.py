"""Per-request sampling parameters, validated once when the request arrives.

Defaults follow vLLM / the OpenAI API. Every bad value raises ValueError naming the field and
the allowed range, so the server can hand the message straight back to the client.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

MAX_LOGPROBS = 20  # OpenAI's upper bound for logprobs / top_logprobs
GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_float(name: str, value) -> float:
    """A finite real number (ints welcome, bools and strings not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _check_int(name: str, value) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


OUTPUT_KINDS = ("cumulative", "final_only")


@dataclass
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    After construction `stop` and `stop_token_ids` are always lists (possibly empty).
    """

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = until max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per generated token (the sampled one always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False
    beam_width: int = 1
    length_penalty: float = 1.0
    # "cumulative": the engine reports the request after every step that moved it (streaming);
    # "final_only": only once it finishes (offline generation: no text is built for steps nobody reads)
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        self.n = _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        self.min_p = _check_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        if self.seed is not None:
            self.seed = _check_int("seed", self.seed)
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "use_beam_search"):
            _check_bool(name, getattr(self, name))

        if self.max_tokens is not None:
            self.max_tokens = _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        self.min_tokens = _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                value = _check_int(name, value)
                if not 0 <= value <= MAX_LOGPROBS:
                    raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] or None, got {value}")

        self.beam_width = _check_int("beam_width", self.beam_width)
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        self.length_penalty = _check_float("length_penalty", self.length_penalty)
        if self.use_beam_search and self.n > self.beam_width:
            raise ValueError(f"n must be <= beam_width ({self.beam_width}) with beam search, got {self.n}")

    @staticmethod
    def _normalise_stop(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a str or a list of str, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only str, got {type(s).__name__} {s!r}")
            if not s:
                raise ValueError("stop strings must be non-empty, got ''")
        return list(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of int, got {type(ids).__name__}")
        for t in ids:
            if not _is_int(t):
                raise ValueError(f"stop_token_ids must contain only int, got {type(t).__name__} {t!r}")
            if t < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {t}")
        return [int(t) for t in ids]

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax instead of sampling."""
        return self.temperature < GREEDY_EPS
