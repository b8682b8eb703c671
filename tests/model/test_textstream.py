"""TextStream: incremental text with stop strings, against a plain "decode all, then cut"."""

from __future__ import annotations

import random

import pytest

from griffin_batch.model import testing
from griffin_batch.model import tokenizer as tokenizer_lib
from griffin_batch.model.textstream import TextStream


class PieceDecoder:
    """A stand-in stream decoder: id i decodes to ``pieces[i]``.

    With ``hold`` it keeps the last id back until the next push or ``flush``,
    like a real decoder holding the bytes of an unfinished character.
    """

    def __init__(self, pieces, hold=False):
        self.pieces, self.hold, self.pending = pieces, hold, []

    def push(self, ids):
        self.pending += list(ids)
        ready = self.pending[:-1] if self.hold else self.pending
        self.pending = self.pending[len(ready) :]
        return "".join(self.pieces[i] for i in ready)

    def flush(self):
        out, self.pending = "".join(self.pieces[i] for i in self.pending), []
        return out


def stream_text(pieces, ids, stop, *, hold=False, split=1):
    """Pushes ``ids`` in groups of ``split``; returns (pieces out, final stopped flag)."""
    ts = TextStream(PieceDecoder(pieces, hold), tuple(stop))
    out = [ts.push(ids[i : i + split]) for i in range(0, len(ids), split)]
    out.append(ts.finish())
    return out, ts


def expected(text, stop):
    """``text`` cut before the earliest stop string in it."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


def expected_stream(pieces, ids, stop, *, hold=False, split=1):
    """The stream ends at the first push whose visible text holds a stop string."""
    visible = ""
    for end in range(split, len(ids) + split, split):
        visible = "".join(pieces[i] for i in ids[: min(end, len(ids)) - hold])
        if expected(visible, stop) != visible:
            return expected(visible, stop)
    return expected("".join(pieces[i] for i in ids), stop)


def test_without_stop_strings_text_passes_straight_through():
    pieces = ["He", "llo", ",", " wor", "ld"]
    out, ts = stream_text(pieces, [0, 1, 2, 3, 4], ())
    assert out == ["He", "llo", ",", " wor", "ld", ""]
    assert not ts.stopped


def test_stop_string_split_across_pushes_is_held_then_cut():
    pieces = ["Hello", " <st", "op", "> after", " <", "star", "t"]
    ts = TextStream(PieceDecoder(pieces), ("<stop>",))
    assert ts.push([0]) == "Hello"
    assert ts.push([1]) == " "  # "<st" might begin the stop string: held back
    assert ts.held == "<st"
    assert ts.push([2]) == ""  # "<stop" still might
    assert ts.push([3]) == ""  # "<stop>" found: nothing after it comes out
    assert ts.stopped and ts.push([4, 5]) == "" and ts.finish() == ""


def test_held_text_is_released_when_it_does_not_become_a_stop_string():
    pieces = [" <", "star", "t", "ed <s"]
    ts = TextStream(PieceDecoder(pieces), ("<stop>",))
    assert ts.push([0]) == " "
    assert ts.push([1]) == "<star"
    assert ts.push([2, 3]) == "ted "
    assert ts.finish() == "<s"  # a held prefix is text after all when the stream ends
    assert not ts.stopped


def test_earliest_stop_string_wins_whatever_its_order_or_length():
    pieces = list("Hello world, hello")
    ids = list(range(len(pieces)))
    for stop in (("world", "lo w"), ("lo w", "world"), ("o", "Hello"), ("d, h", "l")):
        for split in (1, 2, 5, len(ids)):
            out, ts = stream_text(pieces, ids, stop, split=split)
            assert "".join(out) == expected("Hello world, hello", stop), (stop, split)
            assert ts.stopped


def test_overlapping_prefixes_are_found():
    # "aab" starts at index 1 of "aaab": the held suffix must restart correctly.
    out, ts = stream_text(list("xaaab"), [0, 1, 2, 3, 4], ("aab",))
    assert "".join(out) == "xa" and ts.stopped


def test_held_text_stays_shorter_than_the_longest_stop_string():
    stop = ("<<<<<!", "ab")
    ts = TextStream(PieceDecoder(["<", "a"]), stop)
    for i in range(200):
        ts.push([0] if i % 7 else [1])
        assert len(ts.held) <= max(map(len, stop)) - 1


@pytest.mark.parametrize("hold", [False, True])
def test_random_streams_equal_decode_then_cut(hold):
    rng = random.Random(0)
    pieces = ["a", "b", "ab", "ba", "c", "abc", "", "bb", " ", "ca"]
    for _ in range(300):
        ids = [rng.randrange(len(pieces)) for _ in range(rng.randrange(0, 25))]
        text = "".join(pieces[i] for i in ids)
        stop = tuple(
            "".join(rng.choice("abc ") for _ in range(rng.randrange(1, 5)))
            for _ in range(rng.randrange(0, 4))
        )
        split = rng.randrange(1, 4)
        out, ts = stream_text(pieces, ids, stop, hold=hold, split=split)
        assert "".join(out) == expected_stream(pieces, ids, stop, hold=hold, split=split), (
            ids,
            stop,
            split,
        )
        assert ts.stopped == any(s in text for s in stop)


def test_with_a_real_stream_decoder_and_multibyte_characters():
    tok = tokenizer_lib.Tokenizer(testing.train_tiny_tokenizer(vocab_size=512))
    text = "naïve 😀 café résumé, then STOP and more"
    ids = tok.encode(text, add_bos=False)
    for stop in (("STOP",), ("😀 c",), ("é r", "STOP"), ("missing",)):
        ts = TextStream(tok.stream_decoder(), stop)
        out = "".join(ts.push([i]) for i in ids) + ts.finish()
        assert out == expected(tok.decode(ids), stop), stop


def test_the_stop_string_completed_first_ends_the_stream():
    # "b" is complete before "abb" could be: generation ends there, so "abb" never appears.
    out, ts = stream_text(list("abb"), [0, 1, 2], ("b", "abb"))
    assert "".join(out) == "a" and ts.stopped
