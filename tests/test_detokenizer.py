"""Incremental detokenization and stop strings, on real tokenizers trained here in a second."""

from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vattn.detokenizer import IncrementalDetokenizer, decode_logprob_token, token_bytes
from vattn.stop import StopChecker

CORPUS = [
    "héllo wörld 日本語 🙂 naïve café über straße",
    "the quick brown fox jumps over the lazy dog 日本 🙂🙂 ñandú",
    "Ünïcödé text: 東京 大阪 😀 — “quotes” and ‘more’ € £ ¥",
] * 10
ALPHABET = "abc héöü日本語東京🙂😀€ \n"


@lru_cache(maxsize=1)
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@lru_cache(maxsize=1)
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style: "▁" marks spaces and decode() drops the leading one."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def stream(tokenizer, ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], skip_special_tokens=skip_special_tokens)
    deltas = [detok.append(t) for t in ids]
    return detok, deltas


# ---- incremental detokenizer ----


def test_multibyte_character_is_held_until_complete():
    tok = byte_level_tokenizer()
    ids = tok.encode("日本語 🙂")
    pieces = tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids[:1]) == "\ufffd"  # the first token is an incomplete character here
    detok, deltas = stream(tok, ids)
    assert deltas[0] == ""
    assert all("\ufffd" not in d for d in deltas), (pieces, deltas)
    assert "".join(deltas) == detok.text == "日本語 🙂"
    assert detok.finish() == "" and not detok.has_pending


def byte_tokens(tok, data: bytes) -> list[int]:
    """One single-byte token per byte (the byte-level alphabet has all 256)."""
    table = {token_bytes(tok, i): i for i in range(len(tok))}
    return [table[bytes([b])] for b in data]


def test_single_emoji_split_over_byte_tokens():
    tok = byte_level_tokenizer()
    detok, deltas = stream(tok, byte_tokens(tok, "🙂".encode()))
    assert deltas == ["", "", "", "🙂"]


def test_incomplete_tail_released_by_finish():
    tok = byte_level_tokenizer()
    ids = tok.encode("ab") + byte_tokens(tok, "日".encode()[:2])
    detok, deltas = stream(tok, ids)
    assert deltas[-2:] == ["", ""] and detok.text == "ab" and detok.has_pending
    assert detok.finish() == "\ufffd"
    assert detok.text == tok.decode(ids) == "ab\ufffd"
    assert detok.append(byte_tokens(tok, b"c")[0]) == "c"  # appending after finish still works


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, len(byte_level_tokenizer()) - 1), max_size=40), skip=st.booleans())
def test_random_tokens_match_full_decode(ids, skip):
    tok = byte_level_tokenizer()
    detok, deltas = stream(tok, ids, skip_special_tokens=skip)
    for n in range(len(ids) + 1):  # what was shown so far is always a prefix of the full decode
        shown = "".join(deltas[:n])
        assert tok.decode(ids[:n], skip_special_tokens=skip).startswith(shown)
    tail = detok.finish()
    assert "".join(deltas) + tail == detok.text == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, len(byte_level_tokenizer()) - 1), max_size=40),
       cuts=st.lists(st.integers(1, 6), max_size=12), skip=st.booleans())
def test_extend_in_chunks_equals_one_by_one(ids, cuts, skip):
    """The engine detokenizes lazily, several tokens at a time: the text must not depend on the chunking."""
    tok = byte_level_tokenizer()
    one, _ = stream(tok, ids, skip_special_tokens=skip)
    chunked, i = IncrementalDetokenizer(tok, [], skip_special_tokens=skip), 0
    for c in cuts + [len(ids)]:
        chunked.extend(ids[i:i + c])
        i += c
        assert one.text.startswith(chunked.text) or not chunked.text  # never shows what one-by-one would not
    assert chunked.text + chunked.finish() == one.text + one.finish()


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=30))
def test_real_text_never_shows_replacement_char(text):
    tok = byte_level_tokenizer()
    ids = tok.encode(text)
    detok, deltas = stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert detok.text == tok.decode(ids) == text
    assert detok.finish() == ""


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, len(metaspace_tokenizer()) - 1), max_size=30), skip=st.booleans())
def test_metaspace_tokenizer_matches_full_decode(ids, skip):
    tok = metaspace_tokenizer()
    detok, deltas = stream(tok, ids, skip_special_tokens=skip)
    detok.finish()
    assert detok.text == tok.decode(ids, skip_special_tokens=skip)


def test_metaspace_keeps_inner_spaces():
    tok = metaspace_tokenizer()
    ids = tok.encode("the quick brown fox")
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == "the quick brown fox"
    assert len([d for d in deltas if d.startswith(" ")]) == 3


def test_special_tokens_skipped_or_shown():
    tok = byte_level_tokenizer()
    ids = [*tok.encode("ab"), tok.eos_token_id, *tok.encode(" c")]
    assert "".join(stream(tok, ids, skip_special_tokens=True)[1]) == "ab c"
    assert "".join(stream(tok, ids, skip_special_tokens=False)[1]) == "ab<eos> c"
    with pytest.raises(ValueError, match="skip_special_tokens"):
        IncrementalDetokenizer(tok, [], skip_special_tokens="yes")


def test_decode_logprob_token():
    tok = byte_level_tokenizer()
    ids = tok.encode("日本語 🙂 café")
    assert b"".join(token_bytes(tok, i) for i in ids) == "日本語 🙂 café".encode()
    shown = [decode_logprob_token(tok, i) for i in ids]
    for i, s in zip(ids, shown):
        raw = token_bytes(tok, i)
        try:
            assert s == raw.decode("utf-8")
        except UnicodeDecodeError:
            assert s == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    assert any(s.startswith("bytes:\\x") for s in shown)
    assert decode_logprob_token(tok, tok.eos_token_id) == "<eos>"
    space_tok = tok.encode(" the")
    assert "".join(decode_logprob_token(tok, i) for i in space_tok) == " the"
    meta = metaspace_tokenizer()
    assert "".join(decode_logprob_token(meta, i) for i in meta.encode("the fox")) == " the fox"


# ---- stop strings ----


def test_stop_inside_one_delta():
    checker = StopChecker(["lo w"])
    r = checker.check("Hello world", len("llo world"))
    assert (r.stopped, r.stop_str, r.text, r.safe_len) == (True, "lo w", "Hel", 3)
    r = StopChecker(["lo w"], include_stop_str_in_output=True).check("Hello world", 9)
    assert (r.text, r.safe_len) == ("Hello w", 7)


def test_stop_spanning_two_deltas_is_held_back_then_cut():
    checker = StopChecker(["cd", "xyz"])
    r = checker.check("abc", 3)
    assert not r.stopped and r.safe_len == 2  # "c" might start "cd"
    r = checker.check("abcde", 2)
    assert (r.stopped, r.stop_str, r.text) == (True, "cd", "ab")


def test_hold_back_released_when_prefix_does_not_continue():
    checker = StopChecker(["cdx"])
    assert checker.check("abc", 3).safe_len == 2
    assert checker.check("abcd", 1).safe_len == 2
    r = checker.check("abcde", 1)
    assert not r.stopped and r.safe_len == 5 and r.text == "abcde"
    assert StopChecker(["cdx"], include_stop_str_in_output=True).check("abc", 3).safe_len == 3


def test_first_completed_stop_wins():
    r = StopChecker(["abcd", "bc"]).check("xabcd", 5)
    assert (r.stop_str, r.text) == ("bc", "xa")
    r = StopChecker(["c", "abc"]).check("xabc", 4)  # same end: the longer one
    assert (r.stop_str, r.text) == ("abc", "x")


def test_only_the_affected_region_is_searched():
    checker = StopChecker(["ab"])
    # "ab" lies entirely in old text: a caller that checked every delta would have stopped there
    assert not checker.check("ab" + "x" * 5, 3).stopped
    assert checker.check("ab" + "x" * 5, 6).stopped


def test_no_stop_strings_and_bad_input():
    r = StopChecker([]).check("anything", 3)
    assert (r.stopped, r.safe_len, r.text) == (False, 8, "anything")
    with pytest.raises(ValueError, match="stop strings"):
        StopChecker(["ok", ""])
    with pytest.raises(ValueError, match="stop must be a list"):
        StopChecker("abc")
    with pytest.raises(ValueError, match="new_text_len"):
        StopChecker(["a"]).check("abc", 4)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    include=st.booleans(),
)
def test_streaming_equals_non_streaming(text, stops, cuts, include):
    checker = StopChecker(stops, include)
    bounds = sorted({c for c in cuts if 0 < c < len(text)} | {len(text)})
    streamed, sent, prev = "", 0, 0
    result = None
    for b in bounds:
        result = checker.check(text[:b], b - prev)
        prev = b
        assert result.safe_len >= sent  # never takes back what was streamed
        streamed += result.text[sent : result.safe_len]
        sent = result.safe_len
        if result.stopped:
            break
    # character by character, the reference: the first prefix of the text that ends in a stop string
    reference = text
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            reference = text[:end] if include else text[: end - len(s)]
            break
    if result is not None and not result.stopped:
        streamed += result.text[sent:]  # end of generation: release the held tail
    assert streamed == reference
