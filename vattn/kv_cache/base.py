"""The interface the scheduler uses, whichever way the KV cache is laid out. Both managers keep this contract, and
tests/test_kv_contract.py checks it once against each.

  match_prefix(seq)              a pure lookup: the cached units holding the longest prefix of `seq` (PrefixMatch).
  allocate(seq, n, match)        the commit. A sequence that holds no cache yet first takes `match`'s units (their
                                 match.num_tokens tokens need no computing); then its cache grows to hold n tokens.
                                 The positions it will write next, [start, n) with start = match.num_tokens for a
                                 sequence new to the cache and seq.num_computed_tokens otherwise, are made private
                                 first (copy-on-write), and cached units among them leave the prefix cache.
                                 False, with nothing changed, when memory or a row is short.
  fork(parent, child)            `child` (holding nothing, starting with the parent's computed tokens) shares the
                                 parent's computed tokens. False, with nothing changed, when there is no room.
  free(seq)                      release what `seq` holds (computed full units stay in the prefix cache); idempotent.
  build_metadata(seqs, qlens)    pure: raises if a sequence lacks room for its step or would write a shared unit.
                                 (metadata_args is the same as plain lists, built into tensors by .build(device).)
  read_tokens / write_tokens     host copies of a sequence's first n tokens, for swap preemption.

No method writes seq.num_computed_tokens: the scheduler owns it. Every method raises the same ValueError for a
sequence longer than max_model_len.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from vattn.attention.metadata import AttentionMetadata, MetadataArgs
from vattn.sequence import Sequence


@dataclass(frozen=True)
class PrefixMatch:
    units: tuple[Hashable, ...] = ()  # cached units, first unit first
    num_tokens: int = 0  # tokens those units hold: the sequence starts computing after them
    queried_tokens: int = 0  # len(seq) when a lookup was made (hit-rate counters); 0 when none was


NO_MATCH = PrefixMatch()


@dataclass
class KVStats:
    kind: str
    page_bytes: int  # bytes of one allocation unit (a page across all layers, or a block across all layers)
    tokens_per_unit: int
    units_total: int  # physical units in the pool
    units_free: int  # not holding live tokens: unmapped, or idle and ready for reclamation (see below)
    units_mapped: int  # in use by a sequence or held mapped for reuse
    units_idle: int  # mapped but holding no live tokens, kept for reuse (deferred reclamation); 0 on the paged path
    units_shared: int  # mapped in more than one place
    live_tokens: int  # tokens of running sequences held in the cache
    reserved_bytes: int  # virtual address space reserved (vattention) or pool tensor bytes (paged)
    mapped_bytes: int
    used_bytes: int  # bytes that hold live tokens
    map_seconds: float = 0.0
    map_wait_seconds: float = 0.0  # step time spent waiting on mapping (not hidden by the background thread)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class KVCacheManager(ABC):
    """Owns KV memory; answers the scheduler's questions and builds attention metadata for a batch."""

    kind: str
    max_model_len: int

    @abstractmethod
    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Cached units holding the longest prefix of `seq` (never its last token). Changes nothing."""

    @abstractmethod
    def allocate(self, seq: Sequence, num_tokens: int, match: PrefixMatch = NO_MATCH) -> bool:
        """Commit: take `match` (a sequence new to the cache) and grow to `num_tokens` tokens; False = no change."""

    @abstractmethod
    def free(self, seq: Sequence) -> None:
        """Release everything `seq` holds; a sequence holding nothing is a no-op."""

    @abstractmethod
    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Let `child` share `parent`'s computed tokens; False (no change) when there is no room."""

    @abstractmethod
    def metadata_args(self, seqs: list[Sequence], query_lens: list[int]) -> MetadataArgs:
        """What one step's metadata is built from: seq i computes its tokens [num_computed, num_computed + q_i)."""

    def build_metadata(self, seqs: list[Sequence], query_lens: list[int], device: torch.device) -> AttentionMetadata:
        """Metadata for one step: seq i computes its tokens [num_computed, num_computed + query_lens[i])."""
        return self.metadata_args(seqs, query_lens).build(device)

    # Tensor parallelism (vattn.tp_worker): rank 0's manager records the memory operations of each step; every
    # worker's manager (same kind and sizes, its own shard of the heads) applies them before the step's forward.
    @abstractmethod
    def start_recording(self) -> None:
        """From now on, record the operations a twin cache must repeat (page maps and copies, block copies)."""

    @abstractmethod
    def drain_ops(self) -> list:
        """The operations recorded since the last drain, oldest first (picklable)."""

    @abstractmethod
    def apply_ops(self, ops: list) -> None:
        """Repeat a twin's recorded operations here; raises rather than diverge."""

    @abstractmethod
    def check_step(self, args: MetadataArgs) -> None:
        """Raise if this cache (a worker's) cannot hold the step `args` describes."""

    @property
    @abstractmethod
    def attention_backend(self):
        """The object the model's attention layers call."""

    @abstractmethod
    def stats(self) -> KVStats: ...

    @property
    @abstractmethod
    def max_sequence_tokens(self) -> int:
        """The most tokens one sequence could hold with the whole pool to itself."""

    @abstractmethod
    def read_tokens(self, seq: Sequence, n: int) -> list[torch.Tensor]:
        """Host copies of the K/V of `seq`'s first n tokens: one tensor [n, ...] per cache tensor."""

    @abstractmethod
    def write_tokens(self, seq: Sequence, data: list[torch.Tensor]) -> None:
        """Inverse of read_tokens, into `seq`'s cache, allocated (and so made private) just before."""

    def prefetch(self, seqs: list[Sequence]) -> None:
        """Hint: these sequences will each need one more token next step (background mapping)."""

    def reclaim_all(self) -> None:
        """Give idle memory (deferred reclamation) back to the pool; nothing is idle on the paged path."""

    def close(self) -> None: ...

    def check_length(self, num_tokens: int) -> None:
        if num_tokens > self.max_model_len:
            raise ValueError(f"a sequence of {num_tokens} tokens exceeds max_model_len={self.max_model_len}")
