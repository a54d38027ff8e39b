"""Stop strings in time and memory linear in their length (issue 12), checked against a brute-force reference."""

from __future__ import annotations

import time
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from vattn.stop import StopChecker, failure_table


def reference(text: str, new_text_len: int, stops: list[str], include: bool) -> tuple[bool, str, int]:
    """The contract, by brute force: the first end position in the new region where a stop string is complete;
    otherwise hold back the longest tail that is a proper prefix of a stop string."""
    for end in range(len(text) - new_text_len + 1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            cut = end if include else end - len(s)
            return True, text[:cut], cut
    held = 0
    if not include:
        for s in stops:
            for k in range(1, len(s)):
                if text.endswith(s[:k]):
                    held = max(held, k)
    return False, text, len(text) - held


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=6), min_size=1, max_size=3),
    calls=st.lists(st.tuples(st.text(alphabet="abc", max_size=12), st.integers(0, 12), st.booleans()),
                   max_size=8),
    include=st.booleans(),
)
def test_any_call_pattern_equals_brute_force(stops, calls, include):
    """Appending (the engine) or not (a text that changed, a repeated call): always the stateless contract."""
    checker = StopChecker(stops, include)
    text = ""
    for chunk, new_len, append in calls:
        text = text + chunk if append else chunk
        new_len = min(new_len, len(text))
        r = checker.check(text, new_len)
        assert (r.stopped, r.text, r.safe_len) == reference(text, new_len, stops, include), (text, new_len)


def test_failure_table():
    assert list(failure_table("abab")) == [0, 0, 1, 2]
    assert list(failure_table("aaab")) == [0, 1, 2, 0]


def test_a_64k_stop_string_costs_linear_time_and_memory():
    """The old prefix set held every prefix of a 64K string (1.5 GB, 3 s); now a 256 KB table and milliseconds."""
    stop = "a" * 65535 + "b"
    tracemalloc.start()
    t0 = time.perf_counter()
    checker = StopChecker([stop])
    text, held = "", []
    for i in range(2000):  # the worst case for hold-back: the text keeps being a long prefix of the stop string
        delta = "aaaa" if i % 500 else "c"
        text += delta
        r = checker.check(text, len(delta))
        held.append(len(text) - r.safe_len)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not r.stopped and held[-1] == 4 * 499  # the tail since the last "c" could still start the stop string
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
    assert elapsed < 5, f"{elapsed:.1f}s"
    # the stop string itself still stops, once complete
    r = StopChecker([stop]).check("x" + stop + "y", len(stop) + 2)
    assert r.stopped and r.text == "x"
