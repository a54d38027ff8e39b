"""The interface the scheduler and model runner use, whichever way the KV cache is laid out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from vattn.attention.metadata import AttentionMetadata
from vattn.sequence import Sequence


@dataclass
class KVStats:
    kind: str
    page_bytes: int  # bytes of one allocation unit (a page across all layers, or a block across all layers)
    tokens_per_unit: int
    units_total: int  # physical units in the pool
    units_free: int  # not mapped / not in any block table (plus idle units ready for reclamation, see below)
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

    @abstractmethod
    def can_admit(self, seq: Sequence, num_tokens: int) -> bool:
        """Could `seq` (not yet holding cache) get room for `num_tokens` tokens right now?"""

    @abstractmethod
    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s cache to hold `num_tokens` tokens in total; False (and no change) when memory is short."""

    @abstractmethod
    def free(self, seq: Sequence) -> None:
        """Release everything `seq` holds."""

    @abstractmethod
    def build_metadata(self, seqs: list[Sequence], query_lens: list[int], device: torch.device) -> AttentionMetadata:
        """Metadata for one step: seq i computes its tokens [num_computed, num_computed + query_lens[i])."""

    @property
    @abstractmethod
    def attention_backend(self):
        """The object the model's attention layers call."""

    @abstractmethod
    def stats(self) -> KVStats: ...

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """Tokens of `seq`'s prompt already cached (prefix caching); 0 when unsupported."""
        return 0

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Let `child` share `parent`'s cached tokens (copy-on-write later); False when it cannot."""
        return False

    def read_tokens(self, seq: Sequence, n: int) -> list[torch.Tensor]:
        """Host copies of the K/V of `seq`'s first n tokens: one tensor [n, ...] per cache tensor."""
        raise NotImplementedError(f"{self.kind} cache cannot swap")

    def write_tokens(self, seq: Sequence, data: list[torch.Tensor]) -> None:
        """Inverse of read_tokens, into `seq`'s (already allocated) cache."""
        raise NotImplementedError(f"{self.kind} cache cannot swap")

    def prefetch(self, seqs: list[Sequence]) -> None:
        """Hint: these sequences will each need one more token next step (background mapping)."""

    def wait_prefetch(self) -> None:
        """Block until background work started by prefetch() is done."""

    def reclaim_all(self) -> None:
        """Give idle memory (deferred reclamation) back to the pool."""

    def close(self) -> None: ...
