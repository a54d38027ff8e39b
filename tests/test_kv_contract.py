"""The KV manager contract of vattn/kv_cache/base.py, checked once against both paths.

Both caches are built so that one unit (a vAttention page, a paged block) holds 4 tokens of every layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vattn.kv_cache.base import NO_MATCH
from vattn.kv_cache.paged import PagedKVCache
from vattn.kv_cache.vattention import VAttentionKVCache
from vattn.sampling_params import SamplingParams
from vattn.sequence import Sequence

CPU = torch.device("cpu")
TOKENS_PER_UNIT = 4
HEAD_DIM = 256  # 1 layer, 1 kv head, fp32: 1 KiB a token in each of K and V


def make_cache(kind: str, units: int, max_num_seqs: int = 4, prefix: bool = True):
    common = dict(num_layers=1, num_kv_heads=1, head_dim=HEAD_DIM, dtype=torch.float32, device=CPU,
                  max_num_seqs=max_num_seqs, max_model_len=32, enable_prefix_caching=prefix)
    if kind == "vattention":  # a unit is one 4 KiB page in each of the K and V tensors
        return VAttentionKVCache(**common, memory_bytes=units * 2 * 4096, page_size=4096, background_mapping=False)
    return PagedKVCache(**common, memory_bytes=units * TOKENS_PER_UNIT * 2 * HEAD_DIM * 4, block_size=TOKENS_PER_UNIT)


def make_seq(tokens, prompt_logprobs=None) -> Sequence:
    return Sequence(request_id="r", index=0, prompt_token_ids=list(tokens),
                    params=SamplingParams(prompt_logprobs=prompt_logprobs), detokenizer=None, stop_checker=None)


def admit(cache, seq: Sequence, num_tokens: int | None = None) -> bool:
    """What the scheduler does: look up, commit, then record the computed prefix (it owns that count)."""
    match = cache.match_prefix(seq)
    if not cache.allocate(seq, len(seq) if num_tokens is None else num_tokens, match):
        return False
    seq.num_computed_tokens = match.num_tokens
    return True


def write(cache, seq: Sequence, num_tokens: int, value: float) -> None:
    """Compute tokens [num_computed, num_tokens) through the real metadata + K/V write path, all set to `value`."""
    q = num_tokens - seq.num_computed_tokens
    meta = cache.build_metadata([seq], [q], CPU)
    kv = torch.full((q, 1, HEAD_DIM), value)
    cache.attention_backend.write_kv(0, kv, kv, meta)
    seq.num_computed_tokens = num_tokens


def keys(cache, seq: Sequence, n: int) -> torch.Tensor:
    return cache.read_tokens(seq, n)[0][:, 0, 0]


def snapshot(cache) -> dict:
    st = dataclasses.asdict(cache.stats())
    st.pop("map_seconds"), st.pop("map_wait_seconds")
    return st


paths = pytest.mark.parametrize("kind", ["vattention", "paged"])


@paths
def test_match_is_a_pure_lookup_and_allocate_commits_it(kind):
    cache = make_cache(kind, units=8)
    a = make_seq(range(10))
    assert admit(cache, a)
    write(cache, a, 10, 1.0)
    cache.free(a)  # its two full units stay cached
    b = make_seq(list(range(8)) + [7, 7, 7])
    before = snapshot(cache)
    match = cache.match_prefix(b)
    assert cache.match_prefix(b) == match and snapshot(cache) == before  # nothing taken, nothing counted
    assert match.num_tokens == 8 and len(match.units) == 2 and b.num_computed_tokens == 0
    assert cache.allocate(b, len(b), match)
    st = cache.stats()
    assert st.prefix_cache_hits == 8 and st.prefix_cache_queries == 10 + 11
    assert keys(cache, b, 8).tolist() == [1.0] * 8  # the cached tokens are there without computing them
    assert cache.match_prefix(b) == NO_MATCH  # a sequence holding cache has nothing more to match
    assert cache.match_prefix(make_seq(range(10), prompt_logprobs=1)) == NO_MATCH  # wants every prompt logit
    cache.free(b)
    cache.reclaim_all()
    assert cache.stats().units_free == cache.stats().units_total


@paths
def test_a_failed_allocate_changes_nothing(kind):
    cache = make_cache(kind, units=4)
    a, b = make_seq(range(12)), make_seq(range(100, 112))
    assert admit(cache, a)
    before = snapshot(cache)
    assert not admit(cache, b)  # 3 units held, 3 more wanted, 1 left
    assert snapshot(cache) == before and b.num_computed_tokens == 0
    a.num_computed_tokens = 12
    assert not cache.allocate(a, 30) and snapshot(cache) == before


@paths
def test_too_long_is_the_same_error_on_both_paths(kind):
    cache = make_cache(kind, units=4)
    with pytest.raises(ValueError, match="exceeds max_model_len=32"):
        cache.allocate(make_seq(range(40)), 33)


@paths
def test_fork_shares_computed_tokens_and_leaves_the_count_to_the_scheduler(kind):
    cache = make_cache(kind, units=8)
    parent = make_seq(range(6))
    assert admit(cache, parent)
    write(cache, parent, 6, 2.0)
    child = make_seq(range(6))
    assert cache.fork(parent, child)
    assert child.num_computed_tokens == 0  # the scheduler sets it
    child.num_computed_tokens = 6
    st = cache.stats()
    assert st.units_shared == 2 and st.units_mapped == 2
    child.output_token_ids.append(9)
    assert cache.allocate(child, 7)  # its write lands in the shared partial unit: it gets a private copy first
    write(cache, child, 7, 3.0)
    assert keys(cache, parent, 6).tolist() == [2.0] * 6 and keys(cache, child, 7).tolist() == [2.0] * 6 + [3.0]
    with pytest.raises(ValueError, match="already holds"):
        cache.fork(parent, child)
    with pytest.raises(ValueError, match="differ"):
        cache.fork(parent, make_seq([9] * 6))


@paths
def test_fork_without_room_returns_false_and_changes_nothing(kind):
    cache = make_cache(kind, units=3, max_num_seqs=2)
    parent = make_seq(range(6))
    assert admit(cache, parent, 7)  # room for its next token too: it writes into its partial unit this step
    write(cache, parent, 6, 2.0)
    filler = make_seq(range(100, 104))
    assert admit(cache, filler)
    before = snapshot(cache)
    child = make_seq(range(6))
    assert not cache.fork(parent, child)  # the child would need its own copy of the partial unit: none is free
    assert snapshot(cache) == before
    cache.free(filler)
    assert cache.fork(parent, child)
    child.num_computed_tokens = 6
    parent.output_token_ids.append(1)
    write(cache, parent, 7, 5.0)
    assert keys(cache, child, 6).tolist() == [2.0] * 6  # the parent's write did not reach the child


@paths
def test_build_metadata_is_pure_and_checks_room(kind):
    cache = make_cache(kind, units=8)
    a = make_seq(range(6))
    assert admit(cache, a, 6)
    before = snapshot(cache)
    cache.build_metadata([a], [6], CPU)
    assert snapshot(cache) == before
    with pytest.raises(ValueError, match="too few"):
        cache.build_metadata([a], [7], CPU)


@paths
def test_swap_in_never_writes_pages_shared_with_a_fork_or_the_prefix_cache(kind):
    """Issue 13 #2: a swapped-in sequence restores its K/V into a row (or blocks) that may still be shared."""
    cache = make_cache(kind, units=12, max_num_seqs=2)
    parent = make_seq(range(8))
    assert admit(cache, parent)
    write(cache, parent, 8, 1.0)
    child = make_seq(range(8))
    assert cache.fork(parent, child)
    child.num_computed_tokens = 8
    cache.free(parent)  # its row keeps pages mapped that the child still reads, and its units stay cached
    third = make_seq(range(50, 58))
    saved = [torch.full((8, 1, HEAD_DIM), 7.0), torch.full((8, 1, HEAD_DIM), 7.0)]
    third.num_computed_tokens = 8  # a swapped-out sequence keeps its count while its K/V sit on the host
    assert cache.allocate(third, 8)  # the scheduler's swap-in: allocate (which makes [0, 8) private), then write
    cache.write_tokens(third, saved)
    assert keys(cache, child, 8).tolist() == [1.0] * 8
    assert keys(cache, third, 8).tolist() == [7.0] * 8
    again = make_seq(list(range(8)) + [1])  # the parent's prefix is still served, with the parent's contents
    cache.free(third)
    assert admit(cache, again) and again.num_computed_tokens == 8
    assert keys(cache, again, 8).tolist() == [1.0] * 8


@paths
def test_free_is_idempotent_and_everything_comes_back(kind):
    cache = make_cache(kind, units=9)
    seqs = [make_seq(range(i, i + 9)) for i in range(3)]
    for s in seqs:
        assert admit(cache, s)
        write(cache, s, 9, 1.0)
    for s in seqs:
        cache.free(s)
        cache.free(s)
    cache.reclaim_all()
    st = cache.stats()
    assert st.units_free == st.units_total and st.live_tokens == 0 and st.units_idle >= 0
