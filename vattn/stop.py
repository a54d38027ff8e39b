"""Stop strings, checked on the growing output text so that streaming equals non-streaming.

After each delta the caller passes the whole output text and the delta's length. A stop string
`s` can only newly appear as a match that ends in the last `new_text_len` characters, so it is
looked for (with `str.find`, linear in the window) from `len(text) - new_text_len - len(s) + 1`
on. Of the matches found, the one that ends first wins (ties: the longer one); that is the first
moment, character by character, at which any stop string was complete, so the result does not
depend on how the text was split into deltas.

While not stopped, a tail that is a proper prefix of some stop string is held back (`safe_len`):
it might still turn into a stop string that must not reach the client. With
include_stop_str_in_output nothing needs holding back, since the stop string is shown anyway.

Cost: time and memory linear in the stop strings' lengths. The longest tail that is a prefix of
`s` is the state of a Knuth-Morris-Pratt automaton for `s` (its failure table is built once per
distinct string, O(len(s)), and shared by every sequence that uses it). Each checker keeps its
automata's states for the text it last saw, so when the text only grew (the engine's case) just
the new characters are fed, O(1) amortized per character and stop string; any other call pattern
re-runs the automata over the last `len(s) - 1` characters, O(len(s)).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from functools import lru_cache


@dataclass
class StopResult:
    stopped: bool
    stop_str: str | None  # the stop string that matched
    text: str  # the output text, cut at the stop string when stopped
    safe_len: int  # text[:safe_len] may be streamed now


@lru_cache(maxsize=128)
def failure_table(s: str) -> array:
    """KMP failure function: table[i] = length of the longest proper prefix of s[:i+1] that is also its suffix."""
    table = array("i", [0]) * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        if s[i] == s[k]:
            k += 1
        table[i] = k
    return table


class _Automaton:
    """Tracks the longest proper prefix of `s` that is a suffix of the text fed so far."""

    __slots__ = ("s", "table", "state")

    def __init__(self, s: str):
        self.s, self.table, self.state = s, failure_table(s), 0

    def feed(self, chars: str) -> None:
        s, table, k, full = self.s, self.table, self.state, len(self.s)
        for c in chars:
            while k and c != s[k]:
                k = table[k - 1]
            if c == s[k]:
                k += 1
                if k == full:  # a whole match (reported by find, not here): keep the longest proper border
                    k = table[k - 1]
        self.state = k

    def reset_to(self, text: str) -> None:
        """The state for `text`, from its last len(s) - 1 characters (all a proper prefix can span)."""
        self.state = 0
        self.feed(text[max(0, len(text) - len(self.s) + 1):])


class StopChecker:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a list of str, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        if not isinstance(include_stop_str_in_output, bool):
            raise ValueError(f"include_stop_str_in_output must be a bool, got {include_stop_str_in_output!r}")
        self.stop = list(dict.fromkeys(stop))  # duplicates would only cost time
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        # hold-back is only needed without include_stop_str_in_output, and only strings of 2+ characters
        # have a proper prefix to hold
        self._automata = [] if include_stop_str_in_output else [_Automaton(s) for s in self.stop if len(s) > 1]
        self._seen = ""  # the text the automata's states describe

    def check(self, text: str, new_text_len: int) -> StopResult:
        """Look for a stop string that the last `new_text_len` characters of `text` may have completed."""
        if not isinstance(new_text_len, int) or not 0 <= new_text_len <= len(text):
            raise ValueError(f"new_text_len must be in [0, len(text)={len(text)}], got {new_text_len!r}")
        if not self.stop:
            return StopResult(False, None, text, len(text))

        new_start = len(text) - new_text_len
        best: tuple[int, int, str] | None = None  # (end, -len, stop string)
        for s in self.stop:
            pos = text.find(s, max(0, new_start - len(s) + 1))
            if pos >= 0:
                candidate = (pos + len(s), -len(s), s)
                best = candidate if best is None else min(best, candidate)
        if best is not None:
            end, neg_len, s = best
            cut = end if self.include_stop_str_in_output else end + neg_len
            return StopResult(True, s, text[:cut], cut)

        return StopResult(False, None, text, len(text) - self._held_back(text))

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        if not self._automata:
            return 0
        grown = len(text) >= len(self._seen) and text.startswith(self._seen)
        for a in self._automata:
            if grown:
                a.feed(text[len(self._seen):])
            else:
                a.reset_to(text)
        self._seen = text
        return max(a.state for a in self._automata)
