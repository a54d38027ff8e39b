"""The key allocator tests on the cuda backend (driver VMM). Skipped without a GPU."""

import subprocess
import sys
import textwrap
import threading

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
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def pool():
    backend = open_backend("cuda")
    p = PagePool(backend, 8 * backend.page_size)
    yield p
    p.close(force=True)
    backend.close()


def paged(pool, pages=4, dtype=torch.float16):
    per_page = pool.page_size // torch.empty((), dtype=dtype).element_size()
    return VirtualTensor(pool, shape=(pages, per_page), dtype=dtype)


def test_backend_basics():
    with open_backend("auto") as backend:
        assert backend.name == "cuda" and backend.page_size == backend.granularity
        assert backend.page_size % (2 << 20) == 0 and backend.device.type == "cuda"
    with pytest.raises(ValueError, match="multiple of the driver granularity"):
        open_backend("cuda", page_size=64 * 1024)


def test_tensor_is_a_cuda_view_and_kernels_run_on_it(pool):
    vt = VirtualTensor(pool, shape=(2, 256, 8, 128), dtype=torch.bfloat16)  # 1 MiB -> 1 page
    t = vt.tensor
    assert t.is_cuda and t.dtype == torch.bfloat16 and t.data_ptr() == vt.address and t.shape == (2, 256, 8, 128)
    vt.map(0)
    t.normal_()
    ref = t.clone()
    torch.testing.assert_close(t.float().sum(), ref.float().sum())
    out = torch.nn.functional.scaled_dot_product_attention(t[:1].transpose(1, 2), t[:1].transpose(1, 2),
                                                           t[:1].transpose(1, 2))
    assert torch.isfinite(out.float()).all()


def test_sharing_across_tensors_and_copy_on_write(pool):
    a, b = paged(pool), paged(pool)
    (pid,) = a.map(1)
    a.tensor[1].fill_(3.0)
    b.map_shared(2, pid)
    torch.cuda.synchronize()
    assert torch.all(b.tensor[2] == 3.0)
    b.tensor[2, 0] = 7.0
    assert float(a.tensor[1, 0]) == 7.0
    assert b.copy_on_write(2) is True and pool.num_shared == 0
    b.tensor[2].fill_(9.0)
    torch.cuda.synchronize()
    assert float(a.tensor[1, 5]) == 3.0 and float(b.tensor[2, 5]) == 9.0 and float(b.tensor[2, 0]) == 9.0


def test_reuse_exhaustion_and_errors(pool):
    a = paged(pool, pages=10)
    ids = a.map(0, 4)
    a.unmap(0, 4)
    assert sorted(a.map(2, 4)) == sorted(ids)
    free = pool.num_free
    assert free == pool.num_pages - 4
    with pytest.raises(PoolExhaustedError):
        paged(pool, pages=free + 1).map(0, free + 1)
    assert pool.num_free == free and a.mapped_pages() == [2, 3, 4, 5]
    with pytest.raises(MappingError, match="already mapped"):
        a.map(2)
    with pytest.raises(MappingError, match="not mapped"):
        a.unmap(0)
    assert pool.num_free == free


def test_map_many_and_background_thread(pool):
    layers = [paged(pool, pages=2) for _ in range(4)]
    errors = []

    def worker():
        try:
            pool.backend.make_current()
            map_many(layers, 0, 2)
        except Exception as e:
            errors.append(e)

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert not errors and pool.num_free == 0
    for i, t in enumerate(layers):
        t.tensor.fill_(i)
    torch.cuda.synchronize()
    assert [float(t.tensor[1, -1]) for t in layers] == [0.0, 1.0, 2.0, 3.0]


def test_touching_unmapped_memory_fails_the_process():
    code = textwrap.dedent("""
        import torch
        from allocator import PagePool, VirtualTensor, open_backend
        b = open_backend("cuda")
        p = PagePool(b, 2 * b.page_size)
        vt = VirtualTensor(p, shape=(4, b.page_size), dtype=torch.uint8)
        vt.map(0)
        vt.tensor[0].fill_(1)
        torch.cuda.synchronize()
        print("mapped ok", flush=True)
        vt.tensor[2].fill_(1)
        torch.cuda.synchronize()
        print("survived", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "mapped ok" in proc.stdout and "survived" not in proc.stdout
    assert proc.returncode != 0
    assert "illegal" in proc.stderr.lower() or "fault" in proc.stderr.lower(), proc.stderr[-2000:]


def test_versions_match_and_the_tensor_is_built_over_an_unmapped_reservation():
    from allocator.cuda import bindings_version, check_cuda_versions

    check_cuda_versions(torch.version.cuda, bindings_version())  # the installed stack is consistent
    with open_backend("cuda") as backend, PagePool(backend, 2 * backend.page_size) as pool:
        vt = VirtualTensor(pool, shape=(4, backend.page_size), dtype=torch.uint8)  # nothing mapped yet
        assert vt.tensor.device == backend.device and vt.tensor.data_ptr() == vt.address


def test_page_size_not_a_power_of_two():
    """3 x granularity: reserved with a power-of-two alignment; mapping, writing and copy-on-write work."""
    probe = open_backend("cuda")
    gran = probe.granularity
    probe.close()
    with open_backend("cuda", page_size=3 * gran) as backend, PagePool(backend, 4 * backend.page_size) as pool:
        assert backend.alignment == gran
        a = VirtualTensor(pool, shape=(3, backend.page_size), dtype=torch.uint8)
        b = VirtualTensor(pool, shape=(3, backend.page_size), dtype=torch.uint8)
        assert a.address % gran == 0
        ids = a.map(0, 2)
        a.tensor[:2].fill_(5)
        b.map_shared(1, ids[1])
        assert copy_on_write_many([b], [1]) == 1
        b.tensor[1].fill_(6)
        torch.cuda.synchronize()
        assert int(a.tensor[1, -1]) == 5 and int(b.tensor[1, -1]) == 6
    with pytest.raises(ValueError, match="multiple of the driver granularity"):
        open_backend("cuda", page_size=gran + gran // 2)


def test_batched_copy_on_write_on_the_device(pool):
    layers = [paged(pool, pages=1) for _ in range(2)]
    forks = [paged(pool, pages=1) for _ in range(2)]
    for i, (t, f) in enumerate(zip(layers, forks)):
        (pid,) = t.map(0)
        t.tensor[0].fill_(float(i + 1))
        f.map_shared(0, pid)
    assert copy_on_write_many(forks, [0]) == 2 and pool.num_shared == 0
    for f in forks:
        f.tensor[0].fill_(-1.0)
    torch.cuda.synchronize()
    assert [float(t.tensor[0, 3]) for t in layers] == [1.0, 2.0]


def test_device_index_is_honoured():
    last = torch.cuda.device_count() - 1
    with open_backend("cuda", device=f"cuda:{last}") as backend, PagePool(backend, backend.page_size) as pool:
        assert backend.ordinal == last and backend.device == torch.device("cuda", last)
        vt = VirtualTensor(pool, shape=(backend.page_size // 4,), dtype=torch.float32)
        vt.map(0)
        vt.tensor.fill_(2.0)
        assert vt.tensor.device.index == last and float(vt.tensor.sum()) == 2.0 * vt.tensor.numel()
    with pytest.raises(ValueError, match="does not exist"):
        open_backend("cuda", device=torch.cuda.device_count())


def test_write_after_close_is_a_python_error(pool):
    vt = paged(pool, pages=1)
    vt.map(0)
    view = vt.tensor[0]
    vt.close()
    with pytest.raises(AllocatorError, match="closed"):
        _ = vt.tensor
    with pytest.raises(RuntimeError, match="data pointer"):
        view.fill_(1.0)
