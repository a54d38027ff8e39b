"""The cuda backend's decisions, as pure functions: they run (and are tested) without a GPU."""

import pytest
import torch

from allocator.cuda import check_cuda_versions, check_page_size, device_ordinal, reserve_alignment
from allocator.errors import AllocatorError

MIB = 1 << 20


@pytest.mark.parametrize("torch_cuda, bindings, driver", [
    ("13.0", "13.4.4", 13000),   # the GPU box: torch 2.11+cu130, cuda-bindings 13, driver 580 (CUDA 13.0)
    ("12.8", "12.9.1", 12080),
    ("12.4", "12.9.0", 13000),   # a newer driver runs older CUDA
    ("13.0", "13.0.0", None),    # driver version unknown: only the bindings are checked
])
def test_matching_versions_pass(torch_cuda, bindings, driver):
    check_cuda_versions(torch_cuda, bindings, driver)


@pytest.mark.parametrize("torch_cuda, bindings, driver, message", [
    ("12.8", "13.4.4", 13000, r"cuda-bindings 13.4.4 does not match this torch build's CUDA 12.8.*'cuda-bindings==12\.\*'"),
    ("13.0", "12.9.1", 13000, r"cuda-bindings 12.9.1 does not match .*CUDA 13.0.*'cuda-bindings==13\.\*'"),
    ("13.0", "13.4.4", 12080, r"driver supports CUDA 12.8, older than cuda-bindings 13.4.4"),
    (None, "13.4.4", 13000, r"torch build has no CUDA"),
    ("13.0", "garbage", 13000, r"major version of cuda-bindings from 'garbage'"),
])
def test_mismatched_versions_fail_clearly(torch_cuda, bindings, driver, message):
    with pytest.raises(AllocatorError, match=message):
        check_cuda_versions(torch_cuda, bindings, driver)


@pytest.mark.parametrize("page, gran, align", [
    (2 * MIB, 2 * MIB, 2 * MIB),
    (4 * MIB, 2 * MIB, 4 * MIB),
    (6 * MIB, 2 * MIB, 2 * MIB),     # not a power of two: aligned to the largest power of two dividing it
    (12 * MIB, 2 * MIB, 4 * MIB),
    (10 * MIB, 2 * MIB, 2 * MIB),
])
def test_reserve_alignment_is_a_power_of_two_dividing_the_page(page, gran, align):
    got = reserve_alignment(page, gran)
    assert got == align and got & (got - 1) == 0 and page % got == 0 and got % gran == 0


def test_reserve_alignment_refuses_a_strange_granularity():
    with pytest.raises(AllocatorError, match="granularity of 3145728, not a power of two"):
        reserve_alignment(6 * MIB, 3 * MIB)


def test_page_sizes_are_multiples_of_the_granularity():
    assert check_page_size(6 * MIB, 2 * MIB) == 6 * MIB
    with pytest.raises(ValueError, match=r"page_size=65536 must be a multiple of the driver granularity \(2097152 "
                                         r"bytes\) on cuda:1"):
        check_page_size(64 * 1024, 2 * MIB, ordinal=1)
    with pytest.raises(ValueError, match=r"page_size=3145728 must be a multiple"):
        check_page_size(3 * MIB, 2 * MIB)
    for bad in (0, -2 * MIB, 2.0 * MIB, True, "2M"):
        with pytest.raises(ValueError, match="page_size must be a positive int"):
            check_page_size(bad, 2 * MIB)


def test_device_ordinal_honours_the_index():
    assert device_ordinal(None, current=3) == 3
    assert device_ordinal(1) == 1
    assert device_ordinal("cuda:2") == 2
    assert device_ordinal(torch.device("cuda", 1), current=0) == 1
    assert device_ordinal("cuda", current=2) == 2  # no index: the current device
    for bad, message in ((torch.device("cpu"), "needs a CUDA device, got cpu"), (-1, "ordinal >= 0"),
                         ("nonsense", "must be a CUDA device"), (True, "must be a CUDA device")):
        with pytest.raises(ValueError, match=message):
            device_ordinal(bad)
