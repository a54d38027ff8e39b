"""PagedAttention (cpu and torch kernels) and PagedKVCache against a plain full-attention reference, plus the cache's rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vattn.attention.kernels import choose_kernel
from vattn.attention.metadata import AttentionMetadata
from vattn.attention.paged import PagedAttention
from vattn.kv_cache.paged import PagedKVCache
from vattn.kv_cache.prefix_hash import hash_chain
from vattn.sampling_params import SamplingParams
from vattn.sequence import Sequence

CPU = torch.device("cpu")


def make_seq(tokens, prompt_logprobs=None) -> Sequence:
    return Sequence(request_id="r", index=0, prompt_token_ids=list(tokens),
                    params=SamplingParams(prompt_logprobs=prompt_logprobs), detokenizer=None, stop_checker=None)


def reference(q, k, v, scale):
    """Causal attention of all of one sequence's tokens, written out by hand: q [n, H, D], k/v [n, Hk, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    n = q.shape[0]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", F.softmax(s, -1), v)


def make_cache(block_size=4, num_blocks=64, heads=2, head_dim=8, layers=2, prefix=False, kernel="auto"):
    return PagedKVCache(num_layers=layers, num_kv_heads=heads, head_dim=head_dim, dtype=torch.float32, device=CPU,
                        max_num_seqs=8, max_model_len=256, block_size=block_size, enable_prefix_caching=prefix,
                        memory_bytes=num_blocks * block_size * heads * head_dim * 4 * 2 * layers,
                        attention_kernel=kernel)


@pytest.mark.parametrize("kernel", ["cpu", "torch"])
@pytest.mark.parametrize("hq,hk", [(4, 2), (2, 2)])
def test_cpu_kernels_match_reference_over_steps(hq, hk, kernel):
    """Chunked prefill then decode for three sequences of different lengths, all through the cache."""
    torch.manual_seed(0)
    D, bs = 8, 4
    cache = make_cache(block_size=bs, heads=hk, head_dim=D, kernel=kernel)
    for p in cache.k_pools + cache.v_pools:
        p.fill_(float("nan"))  # any read of a slot nobody wrote poisons the output
    attn = cache.attention_backend
    assert attn.kernel == kernel
    lens = [13, 5, 8]  # not multiples of the block size
    seqs = [make_seq(range(n)) for n in lens]
    full = [(torch.randn(n + 6, hq, D), torch.randn(n + 6, hk, D), torch.randn(n + 6, hk, D)) for n in lens]
    schedule = [[7, 5, 8], [6, 1, 1], [1, 1, 1], [1, 1, 1]]  # a chunk of 13, then decodes; seq 1 decodes early
    for step in schedule:
        qlens = []
        for s, q in zip(seqs, step):
            if len(s) < s.num_computed_tokens + q:
                s.output_token_ids.append(0)
            assert cache.allocate(s, s.num_computed_tokens + q)
            qlens.append(q)
        meta = cache.build_metadata(seqs, qlens, CPU)
        q = torch.cat([f[0][s.num_computed_tokens: s.num_computed_tokens + n] for f, s, n in zip(full, seqs, qlens)])
        k = torch.cat([f[1][s.num_computed_tokens: s.num_computed_tokens + n] for f, s, n in zip(full, seqs, qlens)])
        v = torch.cat([f[2][s.num_computed_tokens: s.num_computed_tokens + n] for f, s, n in zip(full, seqs, qlens)])
        outs = [attn.forward(layer, q, k, v, meta) for layer in range(2)]
        start = 0
        for f, s, n in zip(full, seqs, qlens):
            ctx = s.num_computed_tokens + n
            ref = reference(f[0][:ctx], f[1][:ctx], f[2][:ctx], D ** -0.5)[ctx - n: ctx]
            for out in outs:
                torch.testing.assert_close(out[start: start + n], ref, atol=1e-5, rtol=1e-5)
            start += n
            s.num_computed_tokens = ctx


def test_build_metadata_tables_and_slots():
    cache = make_cache(block_size=4)
    a, b = make_seq(range(6)), make_seq(range(9))
    assert cache.allocate(a, 6) and cache.allocate(b, 9)
    a.num_computed_tokens = 5
    meta = cache.build_metadata([a, b], [1, 9], CPU)
    ta, tb = cache.block_table(a), cache.block_table(b)
    assert meta.block_tables.dtype == torch.int32 and meta.block_tables.shape == (2, 3)
    assert meta.block_tables.tolist() == [ta + [0], tb]
    assert meta.slot_mapping.tolist() == [ta[1] * 4 + 1] + [tb[p // 4] * 4 + p % 4 for p in range(9)]
    assert meta.context_lens == [6, 9] and meta.query_lens == [1, 9]
    with pytest.raises(ValueError, match="too few"):
        cache.build_metadata([a], [4], CPU)


def test_allocate_is_all_or_nothing_and_free_returns_blocks():
    cache = make_cache(block_size=4, num_blocks=5)
    a, b = make_seq(range(12)), make_seq(range(12))
    assert cache.allocate(a, 12) and cache.pool.num_free == 2
    assert not cache.allocate(b, 12)
    assert cache.pool.num_free == 2 and b.seq_id not in cache.tables
    st = cache.stats()
    assert (st.kind, st.units_total, st.units_mapped, st.units_free, st.live_tokens) == ("paged", 5, 3, 2, 12)
    assert st.page_bytes == cache.block_bytes == 4 * 2 * 8 * 4 * 2 * 2
    assert st.used_bytes == 12 * cache.token_bytes and st.reserved_bytes == 5 * cache.block_bytes
    cache.free(a)
    cache.free(a)  # twice is harmless
    assert cache.pool.num_free == 5 and cache.allocate(b, 12)
    with pytest.raises(ValueError, match="max_model_len"):
        cache.allocate(b, 257)


def test_fork_shares_blocks_and_copies_partial_block_on_write():
    cache = make_cache(block_size=4)
    parent = make_seq(range(6))
    assert cache.allocate(parent, 6)
    meta = cache.build_metadata([parent], [6], CPU)
    for layer in range(2):
        kv = torch.arange(6.0)[:, None, None].expand(6, 2, 8).contiguous()
        cache.attention_backend.write_kv(layer, kv, kv, meta)
    parent.num_computed_tokens = 6
    child = make_seq(range(6))
    assert cache.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens  # the scheduler's part of a fork
    assert child.num_computed_tokens == 6 and cache.block_table(child) == cache.block_table(parent)
    assert cache.stats().units_shared == 2 and cache.stats().units_mapped == 2
    before = [p.clone() for p in cache.k_pools]
    child.output_token_ids.append(1)
    assert cache.allocate(child, 7)  # the write at position 6 lands in the shared block 1: copy it first
    assert cache.num_cow_copies == 1
    tp, tc = cache.block_table(parent), cache.block_table(child)
    assert tc[0] == tp[0] and tc[1] != tp[1] and cache.pool.refcount[tp[1]] == 1
    for layer in range(2):
        torch.testing.assert_close(cache.k_pools[layer][tc[1]], cache.k_pools[layer][tp[1]])
    meta = cache.build_metadata([child], [1], CPU)
    for layer in range(2):
        cache.attention_backend.write_kv(layer, torch.full((1, 2, 8), 99.0), torch.full((1, 2, 8), 99.0), meta)
    for layer in range(2):
        torch.testing.assert_close(cache.k_pools[layer][tp[1]], before[layer][tp[1]])  # the parent is untouched
    with pytest.raises(ValueError, match="already holds"):
        cache.fork(parent, child)
    with pytest.raises(ValueError, match="differ"):
        cache.fork(parent, make_seq([9] * 6))
    cache.free(parent)
    cache.free(child)
    assert cache.pool.num_free == cache.num_blocks


def test_fork_after_allocate_gives_the_child_its_own_partial_block():
    cache = make_cache(block_size=4)
    parent = make_seq(range(6))
    assert cache.allocate(parent, 6)
    parent.num_computed_tokens = 6
    parent.output_token_ids.append(3)
    assert cache.allocate(parent, 7)  # scheduled first ...
    child = make_seq(range(6))
    child.output_token_ids.append(3)
    assert cache.fork(parent, child)  # ... then forked: the parent's write must still not land in a shared block
    cache.build_metadata([parent], [1], CPU)  # pure: it would raise if the parent's write hit a shared block
    assert cache.num_cow_copies == 1 and cache.pool.refcount[cache.block_table(parent)[1]] == 1


def attach_prefix(cache, seq) -> int:
    """The scheduler's admission, cut short: look up the cached prefix, then commit just those tokens."""
    match = cache.match_prefix(seq)
    assert cache.allocate(seq, match.num_tokens, match)
    seq.num_computed_tokens = match.num_tokens
    return match.num_tokens


def test_prefix_cache_attaches_full_blocks_and_leaves_a_token():
    cache = make_cache(block_size=4, prefix=True)
    a = make_seq(range(10))
    assert cache.match_prefix(a).num_tokens == 0
    assert cache.allocate(a, 10, cache.match_prefix(a))
    a.num_computed_tokens = 10
    cache.free(a)  # its two full blocks stay cached
    assert cache.pool.num_evictable == 2 and cache.pool.num_free == cache.num_blocks
    b = make_seq(list(range(8)) + [50, 51, 52])
    assert attach_prefix(cache, b) == 8
    assert cache.pool.num_evictable == 0 and cache.block_table(b) == [cache.prefix.lookup(h) for h in hash_chain(list(range(8)), 4)]
    c = make_seq(range(8))  # the whole prompt is cached: one block is left to compute
    assert attach_prefix(cache, c) == 4
    d = make_seq([1] + list(range(1, 10)))  # differs in the first block: nothing
    assert attach_prefix(cache, d) == 0
    e = make_seq(range(10), prompt_logprobs=1)  # wants prompt logprobs: skips the cache
    assert attach_prefix(cache, e) == 0
    st = cache.stats()
    assert st.prefix_cache_queries == 10 + 11 + 8 + 10 and st.prefix_cache_hits == 12
    assert st.units_shared == 1  # b and c share block 0
    for s in (b, c, d):
        cache.free(s)
    assert cache.pool.num_free == cache.num_blocks


def test_prefix_cache_evicts_the_tail_of_a_prefix_first():
    cache = make_cache(block_size=4, num_blocks=4, prefix=True)
    a = make_seq(range(13))
    assert cache.allocate(a, 13)
    a.num_computed_tokens = 13
    cache.free(a)  # blocks 0..2 cached, the partial one free
    b = make_seq([100 + i for i in range(8)])
    assert cache.allocate(b, 8)  # takes the free block, then evicts the last cached block of a's prefix
    assert attach_prefix(cache, make_seq(range(13))) == 8


def test_prefix_cache_off_by_default_and_errors():
    cache = make_cache(block_size=4)
    a = make_seq(range(10))
    assert cache.allocate(a, 10)
    a.num_computed_tokens = 10
    cache.free(a)
    assert attach_prefix(cache, make_seq(range(10))) == 0 and cache.prefix is None
    with pytest.raises(ValueError, match="memory_bytes"):
        PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, device=CPU, max_num_seqs=1,
                     max_model_len=8, memory_bytes=10, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, device=CPU, max_num_seqs=1,
                     max_model_len=8, memory_bytes=1 << 20, block_size=0)
    with pytest.raises(ValueError, match="kernel"):
        choose_kernel("paged", "cuda_magic", CPU, torch.float32, 8, 16)
    with pytest.raises(ValueError, match="flash_attn"):
        choose_kernel("paged", "flash_attn", CPU, torch.float32, 8, 16)
    with pytest.raises(ValueError, match="block_size"):
        PagedAttention([torch.zeros(2, 4, 1, 8)], [torch.zeros(2, 4, 1, 8)], 1.0, block_size=8)
    meta = AttentionMetadata.build_contiguous([1], [1], [0])
    with pytest.raises(ValueError, match="block_tables"):
        cache.attention_backend.forward(0, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), meta)
