"""Whole-process checks of the host backend, each in a fresh subprocess (tests/allocator_probe.py):
RSS accounting, SIGSEGV on unmapped memory, and no fd / mapping leaks."""

import json
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.allocator_probe", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"probe failed (rc={proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rss_follows_mapped_and_touched_pages_not_reservation():
    n = 128
    r = last_json(probe("rss", str(n)))
    assert r["reserved_bytes"] == 64 << 30
    expected_kib = n * r["page"] // 1024  # 8 MiB
    # reserving 64 GiB of address space costs (almost) nothing
    assert r["reserved"]["VmRSS"] - r["before"]["VmRSS"] < 4 * 1024
    # mapping alone does not fault pages in
    assert r["mapped"]["RssShmem"] - r["reserved"]["RssShmem"] < 256
    # touching N pages adds N pages of shared (memfd) memory
    grown = r["touched"]["RssShmem"] - r["mapped"]["RssShmem"]
    assert expected_kib <= grown <= expected_kib * 1.05, grown
    assert r["touched"]["VmRSS"] - r["mapped"]["VmRSS"] >= expected_kib
    assert r["checksum"] == n * r["page"] // 4096
    # unmapping removes them from this process's RSS
    assert r["touched"]["RssShmem"] - r["unmapped"]["RssShmem"] >= expected_kib


@pytest.mark.parametrize("where", ["never-mapped", "after-unmap"])
def test_touching_unmapped_page_is_sigsegv(where):
    proc = probe("segv", where)
    assert '"mapped_ok": 3' in proc.stdout  # the mapped page worked before the crash
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr[-1000:])
    assert "survived" not in proc.stdout


def test_create_and_close_200_times_leaks_no_fds_or_mappings():
    r = last_json(probe("churn", "200"))
    assert r["fds_after"] == r["fds_before"], r
    assert r["maps_after"] <= r["maps_before"] + 2, r  # allow an allocator arena or two, not 200
