"""Property test: random map / map_shared / copy_on_write / unmap / write sequences over two small
virtual tensors agree with a plain-Python model of the pool and of page contents."""

import hypothesis.strategies as st
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from allocator import MappingError, PagePool, PoolExhaustedError, VirtualTensor, open_backend

PAGE = 4096
WORDS = PAGE // 4
NUM_PHYS = 6
VPAGES = (5, 4)  # virtual pages of the two tensors


class PoolModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.backend = open_backend("host", page_size=PAGE)
        self.pool = PagePool(self.backend, NUM_PHYS * PAGE)
        self.vts = [VirtualTensor(self.pool, shape=(n, WORDS), dtype=torch.int32) for n in VPAGES]
        self.maps = [{} for _ in VPAGES]  # per tensor: vpage -> physical page id
        self.value = {}  # physical page id -> stamped value (unknown until written)
        self.stamp = 0

    # -- model helpers ----------------------------------------------------------------
    def refcounts(self):
        rc = [0] * NUM_PHYS
        for m in self.maps:
            for pid in m.values():
                rc[pid] += 1
        return rc

    def mapped(self):
        return [(t, v) for t, m in enumerate(self.maps) for v in m]

    # -- rules ------------------------------------------------------------------------
    @rule(t=st.integers(0, 1), first=st.integers(0, 4), count=st.integers(1, 3))
    def map(self, t, first, count):
        vt, m = self.vts[t], self.maps[t]
        span = range(first, first + count)
        free = NUM_PHYS - sum(1 for r in self.refcounts() if r)
        if first + count > VPAGES[t] or any(v in m for v in span):
            try:
                vt.map(first, count)
            except MappingError:
                return
            raise AssertionError("bad map was accepted")
        if count > free:
            try:
                vt.map(first, count)
            except PoolExhaustedError:
                return
            raise AssertionError("map beyond the free pages was accepted")
        ids = vt.map(first, count)
        assert len(set(ids)) == count and all(self.refcounts()[i] == 0 for i in ids)
        for v, pid in zip(span, ids):
            m[v] = pid
            self.value.pop(pid, None)  # fresh pages hold stale data: unknown until written

    @precondition(lambda self: self.mapped())
    @rule(data=st.data(), t=st.integers(0, 1), vpage=st.integers(0, 4))
    def map_shared(self, data, t, vpage):
        src_t, src_v = data.draw(st.sampled_from(self.mapped()))
        pid = self.maps[src_t][src_v]
        if vpage >= VPAGES[t] or vpage in self.maps[t]:
            try:
                self.vts[t].map_shared(vpage, pid)
            except MappingError:
                return
            raise AssertionError("bad map_shared was accepted")
        self.vts[t].map_shared(vpage, pid)
        self.maps[t][vpage] = pid

    @rule(pid=st.integers(0, NUM_PHYS - 1))
    def map_shared_free_page(self, pid):
        holes = [v for v in range(VPAGES[0]) if v not in self.maps[0]]
        if self.refcounts()[pid] == 0 and holes:
            try:
                self.vts[0].map_shared(holes[0], pid)
            except MappingError as e:
                assert "is free" in str(e)
                return
            raise AssertionError("map_shared of a free page was accepted")

    @precondition(lambda self: self.mapped())
    @rule(data=st.data())
    def unmap(self, data):
        t, v = data.draw(st.sampled_from(self.mapped()))
        self.vts[t].unmap(v)
        del self.maps[t][v]

    @rule(t=st.integers(0, 1), vpage=st.integers(0, 4))
    def unmap_unmapped(self, t, vpage):
        if vpage not in self.maps[t]:
            try:
                self.vts[t].unmap(vpage)
            except MappingError:
                return
            raise AssertionError("unmap of an unmapped page was accepted")

    @precondition(lambda self: self.mapped())
    @rule(data=st.data())
    def copy_on_write(self, data):
        t, v = data.draw(st.sampled_from(self.mapped()))
        old = self.maps[t][v]
        rc = self.refcounts()
        if rc[old] < 2:
            assert self.vts[t].copy_on_write(v) is False
            return
        if all(rc):
            try:
                self.vts[t].copy_on_write(v)
            except PoolExhaustedError:
                return
            raise AssertionError("copy_on_write without a free page was accepted")
        assert self.vts[t].copy_on_write(v) is True
        new = self.vts[t].page_at(v)
        assert new != old and rc[new] == 0
        self.maps[t][v] = new
        if old in self.value:
            self.value[new] = self.value[old]
        else:
            self.value.pop(new, None)

    @precondition(lambda self: self.mapped())
    @rule(data=st.data())
    def write(self, data):
        t, v = data.draw(st.sampled_from(self.mapped()))
        self.stamp += 1
        self.vts[t].tensor[v].fill_(self.stamp)
        self.value[self.maps[t][v]] = self.stamp

    # -- checks after every step -----------------------------------------------------
    @invariant()
    def pool_matches_model(self):
        rc = self.refcounts()
        assert [self.pool.refcount(i) for i in range(NUM_PHYS)] == rc
        assert self.pool.num_free == rc.count(0)
        assert self.pool.num_used == NUM_PHYS - rc.count(0)
        assert self.pool.num_shared == sum(1 for r in rc if r >= 2)
        for vt, m in zip(self.vts, self.maps):
            assert vt.mapped_pages() == sorted(m)
            assert all(vt.page_at(v) == pid for v, pid in m.items())

    @invariant()
    def contents_match_model(self):
        for vt, m in zip(self.vts, self.maps):
            for v, pid in m.items():
                if pid in self.value:
                    row = vt.tensor[v]
                    want = self.value[pid]
                    assert int(row[0]) == want and int(row[-1]) == want and int(row[WORDS // 2]) == want

    def teardown(self):
        for vt in self.vts:
            vt.close()
        assert self.pool.num_free == NUM_PHYS
        self.pool.close()
        self.backend.close()


PoolModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestPoolModel = PoolModel.TestCase
