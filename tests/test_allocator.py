"""Allocator behaviour on the host backend, over real mmap/memfd memory."""

import gc
import subprocess
import sys
import textwrap
import threading
import weakref

import pytest
import torch

from allocator import (
    AllocatorError,
    MappingError,
    PagePool,
    PoolExhaustedError,
    VirtualTensor,
    copy_on_write_many,
    map_many,
    open_backend,
    unmap_many,
)

PAGE = 64 * 1024
WORDS = PAGE // 4  # int32 elements per page


@pytest.fixture
def pool():
    backend = open_backend("host", page_size=PAGE)
    p = PagePool(backend, 16 * PAGE)
    yield p
    p.close(force=True)
    backend.close()


def paged(pool, pages=8, dtype=torch.int32):
    """A tensor whose row i is exactly virtual page i."""
    return VirtualTensor(pool, shape=(pages, PAGE // torch.empty((), dtype=dtype).element_size()), dtype=dtype)


def test_shape_reservation_and_views(pool):
    vt = VirtualTensor(pool, shape=(3, 100, 2, 64), dtype=torch.float16)  # 76800 bytes -> 2 pages
    assert vt.nbytes == 3 * 100 * 2 * 64 * 2
    assert vt.num_pages == 2 and vt.reserved_bytes == 2 * PAGE
    t = vt.tensor
    assert t.shape == (3, 100, 2, 64) and t.dtype == torch.float16 and t.is_contiguous()
    assert t.data_ptr() == vt.address and vt.address % 4096 == 0
    assert vt.page_of_offset(0) == 0 and vt.page_of_offset(PAGE - 1) == 0 and vt.page_of_offset(PAGE) == 1
    assert list(vt.pages_for_bytes(PAGE - 2, PAGE + 2)) == [0, 1] and list(vt.pages_for_bytes(5, 5)) == []
    vt.map(0, 2)
    t.fill_(2.5)
    assert float(t.double().sum()) == 2.5 * t.numel()
    vt.close()


def test_bfloat16_tensor_is_a_view_of_the_pages(pool):
    vt = VirtualTensor(pool, shape=(2, PAGE // 2), dtype=torch.bfloat16)
    assert vt.tensor.dtype == torch.bfloat16
    vt.map(0)
    vt.tensor[0].fill_(-3.25)
    raw = vt.tensor[0].view(torch.int16)
    assert torch.equal(raw, torch.full_like(raw, torch.tensor(-3.25, dtype=torch.bfloat16).view(torch.int16)))


def test_shared_page_within_one_tensor(pool):
    vt = paged(pool)
    (pid,) = vt.map(2)
    vt.map_shared(5, pid)
    assert pool.refcount(pid) == 2 and pool.num_shared == 1 and pool.num_used == 1
    vt.tensor[2].fill_(1234)
    assert torch.all(vt.tensor[5] == 1234)
    vt.tensor[5, 7] = -1
    assert int(vt.tensor[2, 7]) == -1
    assert vt.page_at(2) == vt.page_at(5) == pid and vt.mapped_pages() == [2, 5]


def test_shared_page_across_tensors(pool):
    a, b = paged(pool), paged(pool, pages=3)
    ids = a.map(0, 2)
    b.map_shared(1, ids[1])
    a.tensor[1].fill_(77)
    assert torch.all(b.tensor[1] == 77)
    b.tensor[1, 0] = 5
    assert int(a.tensor[1, 0]) == 5
    b.unmap(1)
    assert pool.refcount(ids[1]) == 1 and pool.num_shared == 0
    assert torch.all(a.tensor[1, 1:] == 77)  # the page survives in its other mapping


def test_copy_on_write_isolates_the_writer(pool):
    a, b = paged(pool), paged(pool)
    (pid,) = a.map(0)
    a.tensor[0].fill_(11)
    b.map_shared(3, pid)
    free = pool.num_free
    assert b.copy_on_write(3) is True
    new = b.page_at(3)
    assert new != pid and pool.refcount(pid) == 1 and pool.refcount(new) == 1 and pool.num_free == free - 1
    assert torch.all(b.tensor[3] == 11)  # contents copied
    b.tensor[3].fill_(22)
    assert torch.all(a.tensor[0] == 11) and torch.all(b.tensor[3] == 22)
    assert a.copy_on_write(0) is False and b.copy_on_write(3) is False  # private pages: no-op
    assert pool.stats().cow_copies == 1


def test_unmap_then_map_reuses_the_same_pages(pool):
    vt = paged(pool)
    free0 = pool.num_free
    ids = vt.map(1, 4)
    assert pool.num_free == free0 - 4 and sorted(ids) == ids
    vt.unmap(1, 4)
    assert pool.num_free == free0 and all(pool.refcount(i) == 0 for i in ids)
    again = vt.map(4, 4)
    assert sorted(again) == sorted(ids)


def test_pool_exhaustion_leaves_state_unchanged(pool):
    a, b, c = paged(pool, pages=12), paged(pool, pages=12), paged(pool, pages=12)
    a.map(0, 10)
    snapshot = lambda: (pool.num_free, a.mapped_pages(), b.mapped_pages(), c.mapped_pages(),  # noqa: E731
                        pool.stats().map_calls)
    before = snapshot()
    with pytest.raises(PoolExhaustedError, match=r"7 page\(s\) requested, 6 of 16 free"):
        b.map(0, 7)
    with pytest.raises(PoolExhaustedError, match=r"8 page\(s\) requested"):
        map_many([b, c], 0, 4)  # each tensor alone would fit, both do not
    assert snapshot() == before
    b.map(0, 6)
    assert pool.num_free == 0
    with pytest.raises(PoolExhaustedError):
        b.map(6)
    c.map_shared(0, b.page_at(0))
    with pytest.raises(PoolExhaustedError):
        c.copy_on_write(0)  # needs a fresh page for the copy
    assert c.page_at(0) == b.page_at(0) and pool.refcount(b.page_at(0)) == 2 and pool.num_free == 0


def test_map_many_and_unmap_many(pool):
    layers = [paged(pool, pages=4) for _ in range(4)]
    ids = map_many(layers, 1, 2)
    assert len(ids) == 4 and len({i for row in ids for i in row}) == 8 and pool.num_free == 8
    for t, row in zip(layers, ids):
        assert [t.page_at(1), t.page_at(2)] == row
        t.tensor[1:3].fill_(9)
    layers[2].unmap(2)
    with pytest.raises(MappingError, match=r"tensors\[2\].*\[2\] not mapped"):
        unmap_many(layers, 1, 2)
    assert all(t.is_mapped(1) for t in layers)  # nothing was unmapped
    layers[2].map(2)
    unmap_many(layers, 1, 2)
    assert pool.num_free == 16 and not any(t.mapped_pages() for t in layers)
    # all or nothing: 16 free pages, 5 tensors x 4 pages = 20 needed
    layers.append(paged(pool, pages=4))
    with pytest.raises(PoolExhaustedError):
        map_many(layers, 0, 4)
    assert pool.num_free == 16 and not any(t.mapped_pages() for t in layers)


def test_map_many_rejects_bad_tensor_lists(pool):
    a = paged(pool, pages=4)
    other_backend = open_backend("host", page_size=PAGE)
    other = PagePool(other_backend, 4 * PAGE)
    try:
        with pytest.raises(MappingError, match="empty"):
            map_many([], 0, 1)
        with pytest.raises(MappingError, match="more than once"):
            map_many([a, a], 0, 1)
        with pytest.raises(MappingError, match="different PagePool"):
            map_many([a, paged(other, pages=4)], 0, 1)
        with pytest.raises(MappingError, match=r"tensors\[1\] is a Tensor"):
            map_many([a, torch.zeros(1)], 0, 1)
        a.map(3)
        with pytest.raises(MappingError, match=r"tensors\[0\].*\[3\] already mapped"):
            map_many([a, paged(pool, pages=4)], 2, 2)
        assert pool.num_free == 15
    finally:
        other.close(force=True)
        other_backend.close()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda vt, pid: vt.map(8), r"virtual pages \[8, 9\) are outside the tensor's 8 page"),
        (lambda vt, pid: vt.map(-1), r"virtual pages \[-1, 0\)"),
        (lambda vt, pid: vt.map(6, 3), r"\[6, 9\) are outside"),
        (lambda vt, pid: vt.map(0, 0), "count=0 must be >= 1"),
        (lambda vt, pid: vt.map(1.5), "first must be an int"),
        (lambda vt, pid: vt.map(0), r"virtual page\(s\) \[0\] already mapped"),
        (lambda vt, pid: vt.map_shared(0, pid), r"\[0\] already mapped"),
        (lambda vt, pid: vt.map_shared(1, 9), "physical page 9 is free"),
        (lambda vt, pid: vt.map_shared(1, 16), "page_id=16 is not a page of this pool"),
        (lambda vt, pid: vt.unmap(1), r"virtual page\(s\) \[1\] not mapped"),
        (lambda vt, pid: vt.unmap(0, 3), r"\[1, 2\] not mapped"),
        (lambda vt, pid: vt.copy_on_write(4), r"copy_on_write: virtual page\(s\) \[4\] not mapped"),
        (lambda vt, pid: vt.page_at(8), "outside the tensor"),
        (lambda vt, pid: vt.page_of_offset(8 * PAGE), "byte_offset=524288 is outside"),
        (lambda vt, pid: vt.pool.refcount(-1), "page_id=-1 is not a page"),
    ],
)
def test_misuse_raises_mapping_error(pool, call, message):
    vt = paged(pool)
    (pid,) = vt.map(0)
    state = (pool.num_free, pool.refcount(pid), vt.mapped_pages())
    with pytest.raises(MappingError, match=message) as info:
        call(vt, pid)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AllocatorError)
    assert (pool.num_free, pool.refcount(pid), vt.mapped_pages()) == state


def test_bad_construction_arguments_name_the_field():
    with pytest.raises(ValueError, match="page_size=1000 must be a multiple of the OS page"):
        open_backend("host", page_size=1000)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        open_backend("host", page_size=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        open_backend("tpu")
    backend = open_backend("host")
    assert backend.page_size == 64 * 1024 and backend.device.type == "cpu"
    with pytest.raises(ValueError, match="budget_bytes=65535 is less than one page"):
        PagePool(backend, 65535)
    with pytest.raises(ValueError, match="budget_bytes must be a positive int"):
        PagePool(backend, -5)
    pool = PagePool(backend, PAGE * 2 + 7)
    assert pool.num_pages == 2 and pool.num_free == 2
    with pytest.raises(ValueError, match="shape must be"):
        VirtualTensor(pool, shape=(4, 0))
    with pytest.raises(ValueError, match="shape must be"):
        VirtualTensor(pool, shape=None)
    with pytest.raises(ValueError, match="dtype must be a torch.dtype"):
        VirtualTensor(pool, shape=(4,), dtype="float16")
    with pytest.raises(AllocatorError, match=r"1 page pool\(s\) and 0 reservation\(s\) still use"):
        backend.close()
    pool.close()
    backend.close()
    with pytest.raises(AllocatorError, match="backend is closed"):
        PagePool(backend, PAGE)


def test_auto_backend_is_host_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("GPU present: auto picks cuda")
    with open_backend("auto") as backend:
        assert backend.name == "host"


def test_cuda_backend_without_gpu_fails_cleanly():
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    with pytest.raises(AllocatorError, match="cuInit"):
        open_backend("cuda")


def test_close_semantics(pool):
    backend = pool.backend
    vt = paged(pool)
    vt.map(0, 3)
    vt.map_shared(5, vt.page_at(1))
    with pytest.raises(AllocatorError, match=r"1 VirtualTensor\(s\) still open, mapping 4 page"):
        pool.close()
    vt.close()
    vt.close()  # idempotent
    assert pool.num_free == 16 and pool.stats().reserved_bytes == 0
    with pytest.raises(AllocatorError, match="closed"):
        _ = vt.tensor
    with pytest.raises(MappingError, match="closed"):
        vt.map(0)
    with VirtualTensor(pool, shape=(2, WORDS), dtype=torch.int32) as w:
        w.map(0, 2)
    assert w.closed and pool.num_free == 16
    other = paged(pool)
    other.map(0, 2)
    pool.close(force=True)
    assert other.closed and pool.closed
    with pytest.raises(AllocatorError, match="pool is closed"):
        paged(pool)
    assert backend._live_reservations == 0


def test_stats(pool):
    a, b = paged(pool), paged(pool, pages=2)
    ids = a.map(0, 3)
    b.map_shared(1, ids[2])
    a.unmap(0)
    s = pool.stats()
    assert (s.pages_total, s.pages_free, s.pages_used, s.pages_shared) == (16, 14, 2, 1)
    assert s.reserved_bytes == 10 * PAGE and s.mapped_bytes == 3 * PAGE
    assert (s.map_calls, s.unmap_calls, s.pages_mapped, s.pages_unmapped) == (2, 1, 4, 1)
    assert s.map_seconds > 0 and s.unmap_seconds > 0
    sa = a.stats
    assert (sa.reserved_bytes, sa.mapped_bytes, sa.map_calls, sa.pages_mapped, sa.pages_free) == (8 * PAGE, 2 * PAGE, 1, 3, 14)


def test_background_thread_maps_while_main_thread_reads(pool):
    vt = paged(pool, pages=16)
    errors = []

    def mapper():
        try:
            for v in range(8, 16):
                vt.map(v)
                vt.tensor[v].fill_(v)
        except Exception as e:  # reported below
            errors.append(e)

    vt.map(0, 8)
    vt.tensor[:8].fill_(1)
    th = threading.Thread(target=mapper)
    th.start()
    for _ in range(50):
        assert int(vt.tensor[:8].sum()) == 8 * WORDS
    th.join()
    assert not errors
    assert vt.mapped_pages() == list(range(16)) and pool.num_free == 0
    assert [int(vt.tensor[v, -1]) for v in range(8, 16)] == list(range(8, 16))


def count_calls(monkeypatch, obj, name):
    """Count calls of obj.name, which still runs."""
    calls = []
    real = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


def test_copy_on_write_many_copies_every_shared_page_in_one_batch(pool, monkeypatch):
    layers = [paged(pool, pages=4) for _ in range(3)]
    forks = [paged(pool, pages=4) for _ in range(3)]
    for i, (t, f) in enumerate(zip(layers, forks)):
        ids = t.map(0, 3)
        t.tensor[:3].fill_(10 * i)
        t.tensor[:3, 0] = torch.arange(3, dtype=torch.int32) + 100 * i
        for v in (0, 1):  # pages 0 and 1 shared with the fork; page 2 private
            f.map_shared(v, ids[v])
    batches = count_calls(monkeypatch, pool.backend, "copy_many")
    free = pool.num_free
    assert copy_on_write_many(forks, [0, 1]) == 6
    assert len(batches) == 1 and len(batches[0][0]) == 6  # one batch (one device sync on cuda), not one per page
    assert pool.num_free == free - 6 and pool.num_shared == 0 and pool.stats().cow_copies == 6
    for t, f in zip(layers, forks):
        assert all(f.page_at(v) != t.page_at(v) and pool.refcount(f.page_at(v)) == 1 for v in (0, 1))
        assert torch.equal(f.tensor[:2], t.tensor[:2])  # contents copied
        f.tensor[:2].fill_(-1)
        assert int(t.tensor[:2].min()) >= 0  # the originals are untouched
    assert copy_on_write_many(forks, [0, 1]) == 0 and len(batches) == 1  # private now: nothing to do
    assert copy_on_write_many(layers, [2]) == 0


def test_copy_on_write_many_decides_in_order_and_checks_first(pool):
    a, b, c = paged(pool, pages=2), paged(pool, pages=2), paged(pool, pages=2)
    (pid,) = a.map(0)
    b.map_shared(0, pid)
    assert copy_on_write_many([a, b], [0]) == 1  # a copies; then b holds the only mapping left
    assert a.page_at(0) != pid and b.page_at(0) == pid and pool.refcount(pid) == 1
    c.map_shared(0, pid)
    c.map(1)
    before = (pool.num_free, a.page_at(0), b.page_at(0), c.page_at(0))
    with pytest.raises(MappingError, match=r"tensors\[1\].*\[1\] not mapped"):
        copy_on_write_many([c, a], [0, 1])
    with pytest.raises(MappingError, match="more than once"):
        copy_on_write_many([c], [0, 0])
    assert (pool.num_free, a.page_at(0), b.page_at(0), c.page_at(0)) == before


def test_copy_on_write_many_exhaustion_changes_nothing(pool):
    a, b = paged(pool, pages=8), paged(pool, pages=8)
    ids = a.map(0, 8)
    for v in range(8):
        b.map_shared(v, ids[v])
    filler = paged(pool, pages=8)
    filler.map(0, 7)  # one free page left, eight copies needed
    with pytest.raises(PoolExhaustedError, match=r"8 page\(s\) requested, 1 of 16 free"):
        copy_on_write_many([b], list(range(8)))
    assert pool.num_free == 1 and all(b.page_at(v) == ids[v] for v in range(8)) and pool.num_shared == 8
    filler.unmap(0, 7)
    assert copy_on_write_many([b], list(range(8))) == 8 and pool.num_shared == 0


def test_a_view_keeps_its_virtual_tensor_alive(pool):
    vt = paged(pool, pages=2)
    vt.map(0)
    view = vt.tensor[0, :4]
    ref = weakref.ref(vt)
    vt.close()  # the pool forgets it; only the view still reaches it
    del vt
    gc.collect()
    assert ref() is not None
    del view
    gc.collect()
    assert ref() is None


def test_failed_tensor_construction_gives_the_reservation_back(pool, monkeypatch):
    backend = pool.backend
    live = backend._live_reservations

    def broken(*args, **kwargs):
        raise RuntimeError("injected: cannot build the tensor")

    monkeypatch.setattr(backend, "tensor", broken)
    with pytest.raises(RuntimeError, match="injected"):
        paged(pool)
    assert backend._live_reservations == live and not pool.tensors


def test_use_after_close_is_a_python_error():
    """A write through a view kept past close() raises instead of touching freed memory (in a subprocess: if it
    did touch it, the process would die)."""
    code = textwrap.dedent("""
        import torch
        from allocator import AllocatorError, PagePool, VirtualTensor, open_backend
        b = open_backend("host", page_size=64 * 1024)
        p = PagePool(b, 4 * 64 * 1024)
        vt = VirtualTensor(p, shape=(2, 64 * 1024), dtype=torch.uint8)
        vt.map(0)
        view = vt.tensor[0]
        view.fill_(1)
        vt.close()
        try:
            vt.tensor
        except AllocatorError as e:
            print("tensor:", e, flush=True)
        try:
            view.fill_(2)
        except RuntimeError as e:
            print("write:", str(e)[:60], flush=True)
        print("survived", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "tensor: VirtualTensor.tensor: the tensor is closed" in proc.stdout
    assert "write: Cannot access data pointer" in proc.stdout and "survived" in proc.stdout
