"""The prefix cache: one index from a hash chain of tokens to the memory units that hold their K/V.

Both KV managers use it. A unit is whatever holds one fixed run of tokens in every layer: a block id on the paged
path, the tuple of physical pages (one per virtual tensor) on the vAttention path. The index knows nothing of
memory: a manager registers a unit once its tokens are computed, and forgets it before the unit's content changes
or its memory goes back to the pool.

Unit i of a sequence is keyed by the hash of every token up to the end of unit i (vattn.kv_cache.prefix_hash), so a
match is always a prefix. Counters are in tokens: `queries` grows by len(seq) for each sequence admitted with a
lookup, `hits` by the tokens served from the cache, so hits / queries is the share of prompt tokens not computed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from vattn.kv_cache.prefix_hash import BlockHash, extend_chain


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens of admitted sequences that were looked up
    hits: int = 0  # of those, tokens found cached


class PrefixCache:
    def __init__(self, unit_tokens: int):
        if unit_tokens < 1:
            raise ValueError(f"unit_tokens must be >= 1, got {unit_tokens}")
        self.unit_tokens = unit_tokens
        self._unit_of: dict[BlockHash, Hashable] = {}
        self._hash_of: dict[Hashable, BlockHash] = {}
        self._chains: dict[int, list[BlockHash]] = {}  # seq_id -> memoized hash chain of its full units
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._unit_of)

    def __contains__(self, unit: Hashable) -> bool:
        return unit in self._hash_of

    # -- hashing ----------------------------------------------------------------------------------
    def chain(self, seq, num_units: int) -> list[BlockHash]:
        """Hashes of the first `num_units` full units of `seq`'s tokens (memoized per sequence; a view, do not edit)."""
        return extend_chain(self._chains.setdefault(seq.seq_id, []), seq.token_ids, self.unit_tokens, num_units)

    def fork_chain(self, parent_id: int, child_id: int, num_units: int) -> None:
        """A child that starts with its parent's first `num_units` units shares their hashes."""
        self._chains[child_id] = list(self._chains.get(parent_id, ())[:num_units])

    def drop_chain(self, seq_id: int) -> None:
        self._chains.pop(seq_id, None)

    # -- the index --------------------------------------------------------------------------------
    def match(self, seq) -> list[Hashable]:
        """Units holding the longest cached prefix of `seq`, never its last token (the model must yield logits).
        A pure lookup: nothing is taken or counted."""
        units = []
        for h in self.chain(seq, (len(seq) - 1) // self.unit_tokens):
            unit = self._unit_of.get(h)
            if unit is None:
                break
            units.append(unit)
        return units

    def register(self, unit: Hashable, block_hash: BlockHash) -> bool:
        """Index a computed unit; False when that prefix is already held by another unit (this one stays out)."""
        if block_hash in self._unit_of:
            return self._unit_of[block_hash] == unit
        if unit in self._hash_of:
            raise ValueError(f"unit {unit!r} is already registered under another prefix")
        self._unit_of[block_hash] = unit
        self._hash_of[unit] = block_hash
        return True

    def register_prefix(self, seq, units: Sequence[Hashable], start: int) -> None:
        """Index `seq`'s full units [start, len(units)), whose tokens are all computed; units[i] holds unit i."""
        hashes = self.chain(seq, len(units))
        for i in range(start, len(units)):
            self.register(units[i], hashes[i])

    def lookup(self, block_hash: BlockHash) -> Hashable | None:
        return self._unit_of.get(block_hash)

    def forget(self, unit: Hashable) -> None:
        """The unit's content is about to change or its memory is leaving: it no longer serves its prefix."""
        h = self._hash_of.pop(unit, None)
        if h is not None:
            del self._unit_of[h]

    def record(self, queried_tokens: int, hit_tokens: int) -> None:
        self.stats.queries += queried_tokens
        self.stats.hits += hit_tokens
