"""A sequence is one sample being generated; a request owns n of them (n > 1 = parallel sampling)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from vattn.beam_search import BeamSearch
from vattn.detokenizer import IncrementalDetokenizer
from vattn.outputs import RequestMetrics
from vattn.sampling_params import SamplingParams
from vattn.stop import StopChecker

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV was dropped or swapped out)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # sample index within its request
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    text: str = ""  # output text, cut at a stop string when one matched
    streamable_len: int = 0  # how much of `text` may be shown (a possible stop-string prefix is held back)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    swapped: bool = False  # its KV lives in host memory (swap preemption)
    num_cached_tokens: int | None = None  # prompt tokens served by the prefix cache when first admitted
    _detokenized: int = 0  # output tokens already turned into text

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    def tokens(self, start: int, stop: int) -> list[int]:
        """token_ids[start:stop] without building the whole list."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    def append_token(self, token_id: int, logprob: float, top_logprobs: dict[int, float] | None = None) -> None:
        """Add a generated token. Its text is made when someone asks for it (sync_text)."""
        self.output_token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top_logprobs or {token_id: logprob})

    def sync_text(self) -> int:
        """Detokenize the tokens appended since the last call; returns how many characters of text they added."""
        pending = self.output_token_ids[self._detokenized:]
        if not pending or self.is_finished:
            return 0
        self._detokenized = len(self.output_token_ids)
        delta = self.detokenizer.extend(pending)
        self.text = self.detokenizer.text
        self.streamable_len = len(self.text)
        return len(delta)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        if not isinstance(stop_reason, str) and self.detokenizer is not None:  # (a stop string cut the text)
            self.sync_text()
            self.text += self.detokenizer.finish()  # an incomplete multi-byte character at the very end
        self.status = SequenceStatus.FINISHED
        self.streamable_len = len(self.text)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # n > 1: samples 1..n-1 wait for sample 0's prefill, then fork its cache and sample from the same logits
    pending_forks: list[Sequence] = field(default_factory=list)
    beam: BeamSearch | None = None  # beam search state; its live beams are the unfinished `seqs`
    beam_logprobs: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> next-token logprobs, this round

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        return all(s.is_finished for s in self.seqs)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens the prefix cache served when the request's first sequence was admitted."""
        return (self.seqs[0].num_cached_tokens or 0) if self.seqs else 0

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]
