"""Beam search over the engine's sequences: the same selection rule as Hugging Face transformers.

Every step, each live beam proposes its continuations; the best 2*width (by cumulative logprob) are kept. Those
ending in eos, or reaching max_tokens, finish if they rank within the first `width`; the best `width` others run on.
A beam chosen by several continuations forks (its pages are shared, copy-on-write); a beam chosen by none is
dropped and releases its pages. The search stops when no running beam can beat the worst of `width` finished
hypotheses (score = cumulative logprob / generated_len ** length_penalty), or when every candidate has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Hypothesis:
    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str


@dataclass
class Continuation:
    beam: int  # index into the beams passed to select()
    token_id: int
    cumulative_logprob: float


@dataclass
class BeamSearch:
    width: int
    length_penalty: float
    max_tokens: int
    eos_token_ids: frozenset[int]
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most `width`
    improvable: bool = True
    done: bool = False

    def select(self, outputs: list[list[int]], cumulative: list[float], logprobs: torch.Tensor,
               max_new: int | None = None) -> list[Continuation]:
        """One step. outputs/cumulative: each live beam's tokens so far and its cumulative logprob;
        logprobs: [beams, vocab] log-softmax of their next-token logits. Returns the beams to run next."""
        gen_len = len(outputs[0]) + 1
        limit = self.max_tokens if max_new is None else min(self.max_tokens, max_new)
        scores = logprobs.float() + torch.tensor(cumulative, dtype=torch.float32, device=logprobs.device)[:, None]
        k = min(2 * self.width, scores.numel())
        top, idx = torch.topk(scores.flatten(), k)
        vocab = logprobs.shape[1]
        running: list[Continuation] = []
        for rank, (s, i) in enumerate(zip(top.tolist(), idx.tolist())):
            beam, tok = divmod(i, vocab)
            eos = tok in self.eos_token_ids
            if eos or gen_len >= limit:
                if rank < self.width and self.improvable:
                    self._add(Hypothesis(outputs[beam] + [tok], s, s / gen_len ** self.length_penalty,
                                         "stop" if eos else "length"))
            elif len(running) < self.width:
                running.append(Continuation(beam, tok, s))
        if self.improvable and len(self.finished) == self.width and running:
            best_running = running[0].cumulative_logprob / gen_len ** self.length_penalty
            self.improvable = best_running > self.finished[-1].score
        self.done = not running or not self.improvable
        return [] if self.done else running

    def _add(self, hyp: Hypothesis) -> None:
        self.finished.append(hyp)
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.width:]
