"""Stop strings, checked on the growing output text so that streaming equals non-streaming.

After each delta the caller passes the whole output text and the delta's length. A stop string can
only newly appear in the last `new_text_len + max_stop_len - 1` characters, so only that tail is
searched. Of the matches found, the one that ends first wins (ties: the longer one); that is the
first moment, character by character, at which any stop string was complete, so the result does
not depend on how the text was split into deltas.

While not stopped, a tail that is a proper prefix of some stop string is held back (`safe_len`):
it might still turn into a stop string that must not reach the client. With
include_stop_str_in_output nothing needs holding back, since the stop string is shown anyway.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopResult:
    stopped: bool
    stop_str: str | None  # the stop string that matched
    text: str  # the output text, cut at the stop string when stopped
    safe_len: int  # text[:safe_len] may be streamed now


class StopChecker:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a list of str, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        if not isinstance(include_stop_str_in_output, bool):
            raise ValueError(f"include_stop_str_in_output must be a bool, got {include_stop_str_in_output!r}")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        # every proper, non-empty prefix of some stop string
        self._prefixes = {s[:i] for s in self.stop for i in range(1, len(s))}

    def check(self, text: str, new_text_len: int) -> StopResult:
        """Look for a stop string that the last `new_text_len` characters of `text` may have completed."""
        if not isinstance(new_text_len, int) or not 0 <= new_text_len <= len(text):
            raise ValueError(f"new_text_len must be in [0, len(text)={len(text)}], got {new_text_len!r}")
        if not self.stop:
            return StopResult(False, None, text, len(text))

        start = max(0, len(text) - new_text_len - self.max_stop_len + 1)
        best: tuple[int, int, str] | None = None  # (end, -len, stop string)
        for s in self.stop:
            pos = text.find(s, start)
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
        if self.include_stop_str_in_output:
            return 0
        for n in range(min(self.max_stop_len - 1, len(text)), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0
