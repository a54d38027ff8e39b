"""Continuous batching, and the bookkeeping of every step: which sequences run, what they computed, when they end.

First come, first served. Running sequences go first (decode, or the next chunk of a long prompt), then waiting ones
are admitted while the token budget, the slot count and KV memory allow. When a running sequence cannot grow, the
newest running sequence is preempted (its KV dropped and recomputed later, or swapped to host memory).

The scheduler is the only writer of a sequence's `num_computed_tokens`, and the only place a sequence finishes:
`update` advances the counts after a step, appends the sampled tokens and checks every finish condition (EOS, stop
ids, stop strings, max_tokens, max_model_len); `finish` releases the sequence's memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vattn.kv_cache.base import NO_MATCH, KVCacheManager
from vattn.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None = None
    fork_from: Sequence | None = None  # parallel sampling: a new sample that shares this parent's cache


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, swapper=None, *,
                 eos_token_ids: frozenset[int] = frozenset(), max_model_len: int | None = None):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.swapper = swapper  # None: recompute on preemption
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len or kv.max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.num_preemptions = 0

    # -- the queue ----------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run `child` on `parent`'s computed tokens; without room to share, it queues and prefills on its own."""
        if len(self.running) < self.max_num_seqs and self.kv.fork(parent, child):
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:
            child.num_computed_tokens = 0
            self.waiting.append(child)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (finished, aborted, or dropped by beam search) and release its memory."""
        seq.finish(reason, stop_reason)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.swapper is not None:
            self.swapper.drop(seq)
        self.kv.free(seq)

    def stuck(self) -> Sequence | None:
        """The head of the queue, when nothing could run and nothing running will change that (it is empty, or
        only beams waiting for a sibling): that sequence cannot fit."""
        if not self.waiting or any(s.num_uncomputed_tokens for s in self.running):
            return None
        return self.waiting[0]

    # -- before the step ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens

        # 1. running sequences, oldest first; preempt the newest when one cannot grow
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            q = min(seq.num_uncomputed_tokens, budget)
            if q == 0:  # a beam waiting for its siblings' logits: nothing to compute this step
                i += 1
                continue
            while not self.kv.allocate(seq, seq.num_computed_tokens + q):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.query_lens.append(q)
                budget -= q
                i += 1
                continue
            # `seq` itself was preempted: everything after it is gone too
            break

        # 2. admit waiting sequences in arrival order (preempted ones were put back at the front)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            match = NO_MATCH if seq.swapped else self.kv.match_prefix(seq)
            start = seq.num_computed_tokens if seq.swapped else match.num_tokens
            q = min(len(seq) - start, budget)
            if not self.kv.allocate(seq, start + q, match):
                break
            self.waiting.popleft()
            if seq.swapped:
                self.swapper.swap_in(seq)
            seq.num_computed_tokens = start
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = match.num_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.query_lens.append(q)
            budget -= q

        # map, in the background, the pages next step's decode tokens will need
        self.kv.prefetch([s for s, q in zip(batch.seqs, batch.query_lens) if s.num_computed_tokens + q == len(s)])
        return batch

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)  # the newest: never already in this step's batch
        if self.swapper is not None and self.swapper.can_swap_out(seq):
            self.swapper.swap_out(seq)
        else:
            self.kv.free(seq)
            seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    # -- after the step -----------------------------------------------------------------------------
    def update(self, batch: ScheduledBatch, tokens: list[SampledToken]) -> None:
        """The step computed its tokens: advance the counts, start forked samples, append sampled tokens, and
        finish the sequences that reached an end."""
        for seq, q in zip(batch.seqs, batch.query_lens):
            seq.num_computed_tokens += q
        for t in tokens:  # forks first: a parent may finish on the very token it samples with its children
            if t.fork_from is not None:
                self.fork(t.fork_from, t.seq)
        for t in tokens:
            t.seq.append_token(t.token_id, t.logprob, t.top_logprobs)
            end = self._finish_reason(t.seq, t.token_id)
            if end is not None:
                self.finish(t.seq, *end)

    def _finish_reason(self, seq: Sequence, token_id: int) -> tuple[str, int | str | None] | None:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if n_out >= p.min_tokens:
            if token_id in self.eos_token_ids and not p.ignore_eos:
                return "stop", None
            if p.stop_token_ids and token_id in p.stop_token_ids:
                return "stop", token_id
            if p.stop:  # stop strings need the text of every step
                delta_len = seq.sync_text()
                r = seq.stop_checker.check(seq.text, delta_len)
                seq.text, seq.streamable_len = r.text, r.safe_len
                if r.stopped:
                    return "stop", r.stop_str
        if (p.max_tokens is not None and n_out >= p.max_tokens) or len(seq) >= self.max_model_len:
            return "length", None
        return None
