"""Swap preemption: a preempted sequence's K/V go to host memory and come back when it resumes.

The KV cache manager only has to read and write the first n tokens of a sequence (`read_tokens`/`write_tokens`);
this file owns the host copies. The alternative, recompute, drops the K/V and prefills again.
"""

from __future__ import annotations

import torch

from vattn.kv_cache.base import KVCacheManager
from vattn.sequence import Sequence


class Swapper:
    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.host: dict[int, list[torch.Tensor]] = {}  # seq_id -> per-tensor [n, heads, dim] on the CPU
        self.swapped_out_tokens = 0
        self.swapped_in_tokens = 0

    def can_swap_out(self, seq: Sequence) -> bool:
        return seq.num_computed_tokens > 0

    def swap_out(self, seq: Sequence) -> None:
        """Copy the sequence's computed K/V to the host and free its cache (it keeps its num_computed_tokens)."""
        n = seq.num_computed_tokens
        self.host[seq.seq_id] = self.kv.read_tokens(seq, n)
        self.kv.free(seq)
        seq.swapped = True
        self.swapped_out_tokens += n

    def swap_in(self, seq: Sequence) -> None:
        """Restore the K/V into the cache the scheduler just allocated for `seq` (allocate made it private)."""
        data = self.host.pop(seq.seq_id)
        self.kv.write_tokens(seq, data)
        seq.swapped = False
        self.swapped_in_tokens += data[0].shape[0]

    def drop(self, seq: Sequence) -> None:
        self.host.pop(seq.seq_id, None)
        seq.swapped = False
