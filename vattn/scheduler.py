"""Continuous batching: which sequences run this step and how many tokens each computes.

First come, first served. Running sequences go first (decode, or the next chunk of a long prompt), then waiting ones
are admitted while the token budget, the slot count and KV memory allow. When a running sequence cannot grow, the
newest running sequence is preempted (its KV dropped and recomputed later, or swapped to host memory).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vattn.kv_cache.base import KVCacheManager
from vattn.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, swapper=None):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.swapper = swapper  # None: recompute on preemption
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds its cache (a fork): it runs from the next step on."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and release its memory."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.swapper is not None:
            self.swapper.drop(seq)
        self.kv.free(seq)

    def schedule(self) -> ScheduledBatch:
        self.kv.wait_prefetch()
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
            if seq.num_computed_tokens == 0:
                seq.num_computed_tokens = self.kv.num_cached_prefix_tokens(seq)
            q = min(seq.num_uncomputed_tokens, budget)
            need = seq.num_computed_tokens + q
            admitted = self.kv.can_admit(seq, need) and (
                self.swapper.swap_in(seq, need) if seq.swapped else self.kv.allocate(seq, need))
            if not admitted:
                if not seq.swapped:
                    seq.num_computed_tokens = 0
                    self.kv.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.query_lens.append(q)
            budget -= q
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
