"""A hash chain over token ids: one hash per full unit (block or page) of tokens, each covering the whole prefix.

The hash of unit i is digest(hash of unit i-1, the tokens of unit i), so two sequences share unit i's hash only if
they share every token up to the end of unit i. The chain knows nothing of memory layout: the paged path hashes
blocks, the vAttention path can hash pages or any other fixed number of tokens.

A cryptographic digest (blake2b, 128 bits) rather than Python's `hash()`: a collision would serve one request's
cached K/V to another, and `hash()` of a tuple of small ints is easy to collide on purpose.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes
ROOT: BlockHash = b""  # the parent of the first unit


def hash_unit(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """Hash of one full unit of `tokens` that follows the prefix whose last unit hashed to `parent`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(len(tokens).to_bytes(4, "little"))
    h.update(array("q", tokens).tobytes())
    return h.digest()


def extend_chain(chain: list[BlockHash], token_ids: Sequence[int], unit: int, limit: int | None = None) -> list[BlockHash]:
    """Append to `chain` (in place) the hashes of the next full units of `token_ids`, up to `limit` units in all.

    `chain` holds the hashes of the first len(chain) units already; a partial last unit is never hashed.
    Returns `chain`.
    """
    if unit < 1:
        raise ValueError(f"unit must be >= 1 token, got {unit}")
    n = len(token_ids) // unit if limit is None else min(limit, len(token_ids) // unit)
    parent = chain[-1] if chain else ROOT
    for i in range(len(chain), n):
        parent = hash_unit(parent, token_ids[i * unit:(i + 1) * unit])
        chain.append(parent)
    return chain


def hash_chain(token_ids: Sequence[int], unit: int, limit: int | None = None) -> list[BlockHash]:
    """Hashes of every full unit of `token_ids` (at most `limit`), first unit first."""
    return extend_chain([], token_ids, unit, limit)
