"""Randomized fork / append / free / prefix-attach on the vAttention KV manager, against the facts it must keep:
every computed position holds what was written for its exact token prefix (so copy-on-write and prefix sharing
never leak one sequence's K/V into another), a shared page is never written, refcounts match the mappings, and
every page comes back to the pool at the end."""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vattn.kv_cache.vattention import VAttentionKVCache

TOKENS_PER_PAGE = 4  # 1 kv head x 256 dims x fp32 = 1 KiB a token, 4 KiB pages


@dataclass
class Params:
    prompt_logprobs: int | None = None


@dataclass(eq=False)
class Seq:
    """The attributes of vattn.sequence.Sequence that a KV manager reads."""

    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int = 0
    params: Params = field(default_factory=Params)

    def __len__(self) -> int:
        return len(self.token_ids)


def stamp(tokens: list[int]) -> float:
    return float(zlib.crc32(bytes(str(tokens), "ascii")) % 1_000_003)


ops = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free"]), st.integers(0, 10**6),
                         st.integers(1, 9)), min_size=1, max_size=40)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=ops)
def test_random_sharing_keeps_contents_refcounts_and_pages(layout, script):
    # per_layer: 1 layer's K and V tensors of 1 KiB tokens; interleaved: one tensor, 2 x 512 B per token
    kv = VAttentionKVCache(num_layers=1, num_kv_heads=1, head_dim=256 if layout == "per_layer" else 128,
                           dtype=torch.float32, device=torch.device("cpu"), max_num_seqs=4, max_model_len=40,
                           memory_bytes=2 * 14 * 4096, page_size=4096, background_mapping=False, layout=layout)
    live: list[Seq] = []
    history: list[list[int]] = []  # token lists of every sequence so far, freed ones too (prefix-cache fodder)
    next_id = 0
    try:
        for op, r, q in script:
            if op == "new" and len(live) < 4:
                base = history[r % len(history)][: (r // 7) % 13] if history and r % 3 else []
                seq = Seq(next_id, base + [(r >> k) % 5 for k in range(q)])
                history.append(seq.token_ids)
                next_id += 1
                match = kv.match_prefix(seq)
                if kv.allocate(seq, len(seq), match):
                    seq.num_computed_tokens = match.num_tokens
                    live.append(seq)
                    write(kv, seq, len(seq))
                else:
                    assert seq.seq_id not in kv.slots.slot_of  # a failed commit changes nothing
            elif op == "append" and live:
                seq = live[r % len(live)]
                seq.token_ids += [(r >> k) % 5 for k in range(q)]
                n = min(len(seq), 40)
                seq.token_ids = seq.token_ids[:n]
                if kv.allocate(seq, n):
                    write(kv, seq, n)
                else:
                    del seq.token_ids[seq.num_computed_tokens:]
            elif op == "fork" and live and len(live) < 4:
                parent = live[r % len(live)]
                child = Seq(next_id, list(parent.token_ids[: parent.num_computed_tokens]))
                next_id += 1
                if kv.fork(parent, child):
                    child.num_computed_tokens = parent.num_computed_tokens  # the scheduler's part of a fork
                    live.append(child)
                    history.append(child.token_ids)
            elif op == "free" and live:
                kv.free(live.pop(r % len(live)))
            check(kv, live)
        for seq in live:
            kv.free(seq)
        kv.reclaim_all()
        assert kv.pool.num_free == kv.pool.num_pages
    finally:
        kv.close()


def write(kv: VAttentionKVCache, seq: Seq, n: int) -> None:
    """What the attention layer does: K/V of positions [num_computed, n) land in the sequence's row."""
    slot, t = kv.slot(seq), kv.tensors
    for p in range(seq.num_computed_tokens, n):
        page = slot * kv.pages_per_slot + p // TOKENS_PER_PAGE
        assert kv.pool.refcount(t[0].page_at(page)) == 1, "a shared page was about to be written"
        for i, vt in enumerate(t):
            vt.tensor[slot, p] = stamp(seq.token_ids[: p + 1]) + i  # every element of the token's K/V
    seq.num_computed_tokens = n


def check(kv: VAttentionKVCache, live: list[Seq]) -> None:
    for seq in live:
        slot = kv.slot(seq)
        assert not kv.unmapped_positions(seq, seq.num_computed_tokens)
        for i, vt in enumerate(kv.tensors):
            n = seq.num_computed_tokens
            got = vt.tensor[slot, :n].reshape(n, -1)[:, -1].tolist()
            assert got == [stamp(seq.token_ids[: p + 1]) + i for p in range(seq.num_computed_tokens)]
    # refcounts are exactly the number of places each physical page is mapped
    mapped = Counter(vt.page_at(v) for vt in kv.tensors for v in vt.mapped_pages())
    for pid, n in mapped.items():
        assert kv.pool.refcount(pid) == n
    assert kv.pool.num_used == len(mapped)
