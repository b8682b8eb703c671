"""Tokenizer: reference encoding conventions, special ids, and exact streaming decode."""

from __future__ import annotations

import pickle
import random

import fsspec
import pytest

from griffin_batch.model import testing, tokenizer

TRICKY = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "tabs\tand\nnewlines\n\n\nand   runs     of spaces",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 in text",
    "日本語のテキストと中文文本",
    "accents: café naïve résumé façade Über crème brûlée",
    "mixed: €100 → ½ · ¿qué? ñ ß Ω ∑ 🤖\n",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "\n",
    "",
]

# Three families of SentencePiece decoding behaviour at the start of text.
VARIANTS = {
    "gemma": dict(add_dummy_prefix=False),
    "dummy_prefix": dict(add_dummy_prefix=True),
    "nmt": dict(
        add_dummy_prefix=True, remove_extra_whitespaces=True, normalization_rule_name="nmt_nfkc"
    ),
}


@pytest.fixture(scope="session")
def tokenizer_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    paths = {}
    for name, options in VARIANTS.items():
        paths[name] = str(root / f"{name}.model")
        testing.train_tiny_tokenizer(paths[name], vocab_size=512, **options)
    return paths


@pytest.fixture(scope="session")
def toks(tokenizer_paths):
    return {name: tokenizer.load_tokenizer(p) for name, p in tokenizer_paths.items()}


def test_special_ids_like_gemma(toks):
    tok = toks["gemma"]
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 512)
    assert tok.end_of_turn_id == tok.processor.PieceToId("<end_of_turn>")
    assert tok.id_to_piece(tok.end_of_turn_id) == "<end_of_turn>"
    assert tok.stop_token_ids == (1, tok.end_of_turn_id)


def test_without_end_of_turn(tmp_path):
    path = str(tmp_path / "plain.model")
    testing.train_tiny_tokenizer(path, vocab_size=400, user_defined_symbols=[])
    tok = tokenizer.load_tokenizer(path)
    assert tok.end_of_turn_id is None
    assert tok.stop_token_ids == (tok.eos_id,)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encode_is_reference_convention(toks, variant):
    tok = toks[variant]
    for text in TRICKY:
        ids = tok.encode(text)
        assert ids == [tok.bos_id] + tok.processor.EncodeAsIds(text)
        assert tok.encode(text, add_bos=False) == ids[1:]
        assert tok.decode(ids) == tok.processor.DecodeIds(ids)
        if variant != "nmt":  # nmt normalization rewrites whitespace on purpose
            assert tok.decode(ids) == text


def test_chat_prompt_matches_reference(toks):
    from recurrentgemma import common

    tok = toks["gemma"]
    assert tok.chat_prompt("Why is the sky blue?") == common.apply_it_formatter(
        "Why is the sky blue?"
    )
    assert tok.chat_prompt("x") == "<start_of_turn>user\nx<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(tok.chat_prompt("hi"))
    assert ids.count(tok.end_of_turn_id) == 1  # user-defined symbols are single tokens
    assert ids[1] == tok.processor.PieceToId("<start_of_turn>")


def test_load_from_fsspec_and_pickle(tokenizer_paths, toks):
    with open(tokenizer_paths["gemma"], "rb") as f:
        data = f.read()
    fs = fsspec.filesystem("memory")
    fs.pipe("/tok/tokenizer.model", data)
    try:
        tok = tokenizer.load_tokenizer("memory://tok/tokenizer.model")
    finally:
        fs.rm("/tok", recursive=True)
    assert tok.encode(TRICKY[3]) == toks["gemma"].encode(TRICKY[3])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TRICKY[4]) == tok.encode(TRICKY[4])
    assert clone.stop_token_ids == tok.stop_token_ids


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizer.load_tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a protobuf \x00\xff" * 10)
    with pytest.raises(ValueError, match="junk.model is not a valid SentencePiece model"):
        tokenizer.load_tokenizer(str(junk))
    with pytest.raises(ValueError, match="is a directory"):
        tokenizer.load_tokenizer(str(tmp_path))


def _stream(tok, ids, chunks):
    decoder = tok.stream_decoder()
    out, i = [], 0
    for k in chunks:
        out.append(decoder.push(ids[i : i + k]))
        i += k
        assert decoder.num_held <= 3
    out.append(decoder.push(ids[i:]))
    out.append(decoder.flush())
    return "".join(out), out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stream_decoder_on_tricky_text(toks, variant):
    tok = toks[variant]
    for text in TRICKY:
        for ids in (tok.encode(text), tok.encode(text, add_bos=False), tok.encode(text)[1:] + [1]):
            full = tok.decode(ids)
            for chunks in (
                [1] * len(ids),
                [2] * len(ids),
                [3, 1, 4, 1, 5, 9, 2, 6],
                [len(ids)],
                [],
            ):
                got, _ = _stream(tok, ids, chunks)
                assert got == full, (variant, text, chunks)


def test_stream_decoder_holds_split_characters_back(toks):
    tok = toks["gemma"]
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) == 4 and all(tok.processor.IsByte(i) for i in ids)  # byte fallback
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids] == ["", "", "", "😀"]
    decoder.push(ids[:2])
    assert decoder.num_held == 2
    assert decoder.flush() == tok.decode(ids[:2])  # an unfinished character becomes U+FFFD
    assert decoder.num_held == 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stream_decoder_on_random_ids(toks, variant):
    """Any id sequence, including invalid UTF-8 byte runs, streams to exactly decode(ids)."""
    tok = toks[variant]
    rng = random.Random(variant)
    byte_ids = [i for i in range(tok.vocab_size) if tok.processor.IsByte(i)]
    space = tok.processor.PieceToId("\u2581")
    for _ in range(400):
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randint(0, 24))
        ]
        if rng.random() < 0.3:
            ids = [rng.choice([tok.bos_id, tok.eos_id, space])] * rng.randint(1, 3) + ids
        chunks = [rng.choice([1, 1, 2, 3, 7]) for _ in range(len(ids))]
        got, _ = _stream(tok, ids, chunks)
        assert got == tok.decode(ids), ids


def test_stream_decoder_state_stays_bounded(toks):
    tok = toks["gemma"]
    ids = tok.encode(" ".join(TRICKY) * 20)
    decoder = tok.stream_decoder()
    pieces = []
    for i in ids:
        pieces.append(decoder.push(i))
        assert decoder.num_held <= 3
    pieces.append(decoder.flush())
    assert "".join(pieces) == tok.decode(ids)
    assert sum(bool(p) for p in pieces) > len(ids) // 2  # text flows token by token
