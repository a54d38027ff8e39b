"""Incremental detokenization: text deltas for streaming, one token at a time.

Decoding the whole output every step costs O(n) per token. Instead we keep two offsets into the
output ids: text before `_prefix` is settled; `[_prefix, _read)` is the last settled chunk, kept as
left context (tokenizers such as SentencePiece render a token differently at the start of a
string); tokens from `_read` on are not yet shown. Each step decodes `[_prefix, end)`, subtracts
the decoding of `[_prefix, _read)` and emits the rest, unless it ends in U+FFFD: then the last
character is (probably) incomplete, split across byte-level tokens, and the text is held back
until a later token completes it. A step that shows nothing new (a skipped special token) settles
nothing either, so the context never shrinks to empty text. `finish()` releases whatever is held.

Chunks are only settled on a complete character, so for byte-level BPE the concatenated deltas
equal tokenizer.decode(output_ids) exactly (property-tested, with a Metaspace tokenizer too).
Decoding uses the tokenizer's own decode(), so clean_up_tokenization_spaces=True tokenizers, whose
clean-up looks across chunk borders, may differ slightly; modern tokenizers have it off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

REPLACEMENT_CHAR = "\ufffd"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class IncrementalDetokenizer:
    """Turns output token ids into text deltas.

    prompt_token_ids are kept for reference only: the output is decoded on its own, so that the
    final text equals tokenizer.decode(output_ids, skip_special_tokens=...).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        if not isinstance(skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be a bool, got {skip_special_tokens!r}")
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0
        self._read = 0

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text it makes visible (possibly "")."""
        self.token_ids.append(int(token_id))
        return self._emit(hold_incomplete=True)

    def extend(self, token_ids: Sequence[int]) -> str:
        """Add several generated tokens at once; the same text as appending them one by one, in one decode."""
        self.token_ids.extend(int(t) for t in token_ids)
        return self._emit(hold_incomplete=True)

    def finish(self) -> str:
        """Release held-back text (an incomplete character becomes U+FFFD). Call when the sequence ends."""
        return self._emit(hold_incomplete=False)

    @property
    def has_pending(self) -> bool:
        """True when some appended tokens' text is held back (an incomplete character)."""
        if self._read == len(self.token_ids):
            return False
        return self._decode(self.token_ids[self._prefix :]) != self._decode(
            self.token_ids[self._prefix : self._read]
        )

    def _emit(self, hold_incomplete: bool) -> str:
        if self._read == len(self.token_ids):
            return ""
        context = self._decode(self.token_ids[self._prefix : self._read])
        full = self._decode(self.token_ids[self._prefix :])
        if hold_incomplete and full.endswith(REPLACEMENT_CHAR):
            return ""
        # With well-behaved tokenizers `full` starts with `context`; if one does not, emit the
        # part past the context's length rather than repeating text already sent.
        delta = full[len(context) :]
        if not delta:
            # nothing visible yet (e.g. a skipped special token): keep the current context, so a
            # SentencePiece token after it is still not rendered as the start of a string
            return ""
        self._prefix, self._read = self._read, len(self.token_ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte is shown as one printable character.

    Printable bytes stand for themselves; the others (controls, space, 0x7F-0xA0, 0xAD) are
    shifted, in order, to code points from 256 up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in set(printable)]
    for i, b in enumerate(shifted):
        table[chr(256 + i)] = b
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for (with its leading space, if it has one)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    if added is not None:
        return getattr(added, "content", str(added)).encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        raise ValueError(f"token_id {token_id} is not in the tokenizer's vocabulary")
    match = _BYTE_FALLBACK.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    table = _unicode_to_byte()
    if _is_byte_level(tokenizer) and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if "\u2581" in piece:  # SentencePiece marks spaces with U+2581
        return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def decode_logprob_token(tokenizer, token_id: int) -> str:
    """One token as a string for the OpenAI logprobs format.

    Tokens that are not valid UTF-8 on their own (part of a multi-byte character) come back as
    "bytes:\\xe6\\x97" rather than a lossy U+FFFD.
    """
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
