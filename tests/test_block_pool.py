"""BlockPool, the prefix hash chain, and PagedKVCache's sharing (fork, copy-on-write, prefix caching) against a
plain-Python model driven by random operations."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vattn.kv_cache.block_pool import BlockPool, BlockPoolExhaustedError
from vattn.kv_cache.paged import PagedKVCache
from vattn.kv_cache.prefix_cache import PrefixCache
from vattn.kv_cache.prefix_hash import ROOT, extend_chain, hash_chain, hash_unit
from vattn.sampling_params import SamplingParams
from vattn.sequence import Sequence


def make_seq(tokens, prompt_logprobs=None) -> Sequence:
    return Sequence(request_id="r", index=0, prompt_token_ids=list(tokens),
                    params=SamplingParams(prompt_logprobs=prompt_logprobs), detokenizer=None, stop_checker=None)


# -- prefix hash -----------------------------------------------------------------------------------
def test_hash_chain_depends_on_whole_prefix():
    a = hash_chain([1, 2, 3, 4, 5, 6, 7], unit=3)
    b = hash_chain([1, 2, 3, 4, 5, 6, 9], unit=3)
    c = hash_chain([9, 2, 3, 4, 5, 6], unit=3)
    assert len(a) == 2 and a == b  # the partial last unit is not hashed
    assert c[1] != a[1] and c[0] != a[0]  # same second unit, different first: different chain
    assert a[0] == hash_unit(ROOT, [1, 2, 3]) and a[1] == hash_unit(a[0], [4, 5, 6])
    assert hash_unit(ROOT, [1, 2]) != hash_unit(ROOT, [1, 2, 0])


def test_extend_chain_is_incremental_and_limited():
    tokens = list(range(20))
    chain = extend_chain([], tokens[:9], 4)
    assert len(chain) == 2
    assert extend_chain(chain, tokens, 4, limit=4) == hash_chain(tokens, 4)[:4]
    with pytest.raises(ValueError, match="unit"):
        hash_chain(tokens, 0)


# -- block pool ------------------------------------------------------------------------------------
def test_pool_refcounts_and_free_list():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert sorted([a, b, c]) == [0, 1, 2] and pool.num_free == 0
    with pytest.raises(BlockPoolExhaustedError):
        pool.allocate()
    pool.incref(a)
    assert pool.num_shared == 1
    pool.decref(a)
    assert pool.num_free == 0 and pool.refcount[a] == 1
    pool.decref(a)
    assert pool.num_free == 1
    with pytest.raises(ValueError, match="not in use"):
        pool.decref(a)
    with pytest.raises(ValueError, match="free"):
        pool.incref(a)
    with pytest.raises(ValueError, match="out of range"):
        pool.incref(7)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_pool_cached_blocks_are_evicted_lru():
    cache = PrefixCache(unit_tokens=1)
    pool = BlockPool(3, cache)
    blocks = [pool.allocate() for _ in range(3)]
    for i, blk in enumerate(blocks):
        assert cache.register(blk, bytes([i]))
    assert not cache.register(blocks[0], bytes([1]))  # that prefix is already held by another block
    for blk in (blocks[1], blocks[0], blocks[2]):  # released in this order
        pool.decref(blk)
    assert pool.num_free == 3 and pool.num_evictable == 3
    pool.incref(cache.lookup(bytes([2])))  # taken back: no longer evictable
    assert pool.num_evictable == 2
    assert pool.allocate() == blocks[1]  # least recently released goes first
    assert cache.lookup(bytes([1])) is None and cache.lookup(bytes([0])) == blocks[0]
    assert pool.num_evictions == 1
    assert pool.clear_cache() == 1 and cache.lookup(bytes([0])) is None and pool.num_free == 1


def test_pool_prefers_uncached_free_blocks():
    cache = PrefixCache(unit_tokens=1)
    pool = BlockPool(2, cache)
    a = pool.allocate()
    cache.register(a, b"x")
    pool.decref(a)
    b = pool.allocate()
    assert b != a and cache.lookup(b"x") == a


# -- PagedKVCache against a plain-Python model ------------------------------------------------------
BS, NUM_BLOCKS, LAYERS = 4, 12, 2


def stamp(tokens: list[int], layer: int) -> float:
    """What a model would write at the last position of `tokens`: a function of the whole prefix."""
    h = 7
    for t in tokens:
        h = (h * 31 + t + 1) % 1_000_003
    return float(h + layer * 2_000_000)  # exact in float32


class Model:
    """The expected state, block ids being the model's own; physical ids are matched up as we go."""

    def __init__(self):
        self.next_id = 0
        self.refs: dict[int, int] = {}
        self.hash: dict[int, bytes] = {}
        self.index: dict[bytes, int] = {}
        self.uncached_free = NUM_BLOCKS
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.seqs: dict[int, dict] = {}  # seq_id -> {"blocks": [...], "registered": n}

    @property
    def num_free(self):
        return self.uncached_free + len(self.evictable)

    def new_block(self):
        if self.uncached_free:
            self.uncached_free -= 1
        else:
            old, _ = self.evictable.popitem(last=False)
            del self.index[self.hash.pop(old)]
        self.next_id += 1
        self.refs[self.next_id] = 1
        return self.next_id

    def incref(self, b):
        self.evictable.pop(b, None)
        self.refs[b] += 1

    def decref(self, b):
        self.refs[b] -= 1
        if self.refs[b] == 0:
            if b in self.hash:
                self.evictable[b] = None
            else:
                self.uncached_free += 1

    def register(self, seq):
        m = self.seqs[seq.seq_id]
        full = min(seq.num_computed_tokens // BS, len(m["blocks"]))
        chain = hash_chain(seq.token_ids, BS, full)
        for i in range(m["registered"], full):
            if chain[i] not in self.index:
                self.index[chain[i]] = m["blocks"][i]
                self.hash[m["blocks"][i]] = chain[i]
        m["registered"] = max(m["registered"], full)


def check(cache: PagedKVCache, model: Model, seqs: list[Sequence], phys_of: dict[int, int]):
    pool = cache.pool
    assert pool.num_free == model.num_free
    assert pool.num_evictable == len(model.evictable)
    for seq in seqs:
        mblocks, table = model.seqs[seq.seq_id]["blocks"], cache.tables[seq.seq_id]
        assert len(table) == len(mblocks)
        for mb, pb in zip(mblocks, table):
            assert phys_of.setdefault(mb, pb) == pb, "one model block must be one physical block"
            assert pool.refcount[pb] == model.refs[mb]
        for layer in range(LAYERS):  # every computed position holds exactly what its prefix wrote
            k = cache.k_pools[layer].view(-1, 1, 2)
            for p in range(seq.num_computed_tokens):
                slot = table[p // BS] * BS + p % BS
                assert k[slot, 0, 0].item() == stamp(seq.token_ids[: p + 1], layer), (seq.seq_id, p)
    live = {b for s in seqs for b in model.seqs[s.seq_id]["blocks"]}
    assert len({phys_of[b] for b in live}) == len(live)


def write_step(cache: PagedKVCache, seq: Sequence, q: int):
    """Run the real metadata + K/V write path for `q` new tokens of `seq`, checking no shared block is written."""
    meta = cache.build_metadata([seq], [q], torch.device("cpu"))
    for slot in meta.slot_mapping.tolist():
        assert cache.pool.refcount[slot // BS] == 1, "a shared block is about to be written"
    start = seq.num_computed_tokens
    for layer in range(LAYERS):
        vals = torch.tensor([stamp(seq.token_ids[: p + 1], layer) for p in range(start, start + q)])
        kv = vals[:, None, None].expand(q, 1, 2).contiguous()
        cache.attention_backend.write_kv(layer, kv, -kv, meta)


ops = st.lists(st.tuples(st.sampled_from(["new", "new", "step", "step", "step", "fork", "free"]),
                         st.integers(0, 10**6), st.lists(st.integers(1, 2), min_size=1, max_size=11)),
               min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops)
def test_sharing_and_prefix_cache_match_model(ops):
    cache = PagedKVCache(num_layers=LAYERS, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                         device=torch.device("cpu"), max_num_seqs=8, max_model_len=64,
                         memory_bytes=NUM_BLOCKS * BS * LAYERS * 2 * 2 * 4, block_size=BS,
                         enable_prefix_caching=True)
    assert cache.num_blocks == NUM_BLOCKS
    model, seqs, phys_of = Model(), [], {}
    for op, r, tokens in ops:
        if op == "new" and len(seqs) < 6:
            seq = make_seq(tokens)
            model.seqs[seq.seq_id] = {"blocks": [], "registered": 0}
            # model's prefix lookup: longest chain of indexed blocks, leaving >= 1 token to compute
            hits = []
            for h in hash_chain(seq.token_ids, BS, (len(seq) - 1) // BS):
                if h not in model.index:
                    break
                hits.append(model.index[h])
            match = cache.match_prefix(seq)
            assert match.num_tokens == len(hits) * BS
            need = -(-len(seq) // BS) - len(hits)
            taken = sum(1 for b in hits if model.refs[b] == 0)  # cached blocks taken back leave the free count
            ok = cache.allocate(seq, len(seq), match)
            assert ok == (need + taken <= model.num_free)
            if ok:
                for b in hits:
                    model.incref(b)
                model.seqs[seq.seq_id].update(blocks=list(hits) + [model.new_block() for _ in range(need)],
                                              registered=len(hits))
                seq.num_computed_tokens = match.num_tokens
                write_step(cache, seq, len(seq) - match.num_tokens)
                seq.num_computed_tokens = len(seq)
                seqs.append(seq)
            else:
                assert seq.seq_id not in cache.tables  # a failed commit changes nothing
                model.seqs.pop(seq.seq_id)
        elif op == "step" and seqs:
            seq = seqs[r % len(seqs)]
            if seq.num_computed_tokens == len(seq) and len(seq) < 64:
                seq.output_token_ids.append(tokens[0])  # the token sampled last step
            q = min(1 + r % 3, len(seq) - seq.num_computed_tokens)
            if q == 0:
                continue
            m = model.seqs[seq.seq_id]
            model.register(seq)
            target = seq.num_computed_tokens + q
            i = seq.num_computed_tokens // BS
            cow = i < len(m["blocks"]) and model.refs[m["blocks"][i]] > 1
            need = -(-target // BS) - len(m["blocks"]) + int(cow)
            ok = cache.allocate(seq, target)
            assert ok == (need <= model.num_free)
            if ok:
                if cow:
                    new = model.new_block()
                    model.decref(m["blocks"][i])
                    m["blocks"][i] = new
                m["blocks"] += [model.new_block() for _ in range(-(-target // BS) - len(m["blocks"]))]
                write_step(cache, seq, q)
                seq.num_computed_tokens = target
        elif op == "fork" and seqs and len(seqs) < 6:
            parent = seqs[r % len(seqs)]
            child = make_seq(parent.prompt_token_ids)
            child.output_token_ids = list(parent.output_token_ids)
            assert cache.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens  # the scheduler's part of a fork
            pm = model.seqs[parent.seq_id]
            shared = pm["blocks"][: -(-parent.num_computed_tokens // BS)]
            for b in shared:
                model.incref(b)
            model.seqs[child.seq_id] = {"blocks": list(shared),
                                        "registered": min(pm["registered"], parent.num_computed_tokens // BS)}
            seqs.append(child)
        elif op == "free" and seqs:
            seq = seqs.pop(r % len(seqs))
            model.register(seq)
            cache.free(seq)
            for b in reversed(model.seqs.pop(seq.seq_id)["blocks"]):
                model.decref(b)
        check(cache, model, seqs, phys_of)
    for seq in seqs:
        cache.free(seq)
    assert cache.pool.num_free == NUM_BLOCKS and cache.pool.num_used == 0  # no leak: free + evictable == total
    assert all(r == 0 for r in cache.pool.refcount)
    st_ = cache.stats()
    assert st_.units_free == NUM_BLOCKS and st_.units_mapped == 0 and st_.live_tokens == 0
