"""The bundled demo model: small, trained, reproducible from the corpus on every Python."""

from __future__ import annotations

import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece

from griffin_batch.model import checkpoint, demo, demo_train, griffin, tokenizer

MAX_BYTES = 20_000_000


@pytest.fixture(scope="module")
def shipped():
    config, params = checkpoint.load_checkpoint(demo.demo_checkpoint_path())
    return config, params, tokenizer.load_tokenizer(demo.demo_tokenizer_path())


@pytest.fixture(scope="module")
def corpus():
    return demo_train.corpus_documents()


def test_shipped_demo_loads_and_is_small(shipped):
    config, params, tok = shipped
    assert config == demo.DEMO_CONFIG
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert tok.vocab_size == config.vocab_size and tok.end_of_turn_id is not None
    record = demo.training_record()
    count = sum(x.size for x in jax.tree.leaves(params))
    assert record["parameters"] == count >= 2_000_000
    size = sum(os.path.getsize(os.path.join(r, f))
               for r, _, fs in os.walk(demo.DEMO_DIR) for f in fs)
    print(f"demo: {count:,} parameters, {size:,} bytes on disk, trained "
          f"{record['train_seconds']} s, held-out perplexity {record['perplexity']['held_out']}")
    assert size <= MAX_BYTES


def test_shipped_demo_is_trained(shipped, corpus):
    """Held-out perplexity far below a random model's (about the vocabulary size, 2048)."""
    config, params, tok = shipped
    _, held_out = demo_train.split_documents(corpus)
    sp = sentencepiece.SentencePieceProcessor(model_file=demo.demo_tokenizer_path())
    stream = demo_train.encode(sp, held_out)[:8 * 256 + 1]
    f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    ppl = demo_train.perplexity(config, f32, stream, length=256)
    print(f"held-out perplexity on {stream.size - 1} tokens: {ppl:.1f} "
          f"(training.json, all held-out tokens: {demo.training_record()['perplexity']['held_out']})")
    assert ppl < config.vocab_size / 20


def test_demo_writes_words_from_its_corpus(shipped, corpus):
    """Greedy text from the shipped weights: mostly words the corpus uses, not byte noise."""
    config, params, tok = shipped
    ids = tok.encode('The "for" statement')
    # One shape for every step (the model is causal: the zeros after the text change
    # nothing before them), so the forward pass compiles once instead of 24 times.
    length = len(ids) + 24
    for _ in range(24):
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(ids)] = ids
        logits = griffin.forward_logits(config, params, padded)
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    text = tok.decode(ids[1:])
    known = set(" ".join(corpus).split())  # the corpus's own words, punctuation attached
    words = text.split()
    good = [w for w in words if w in known]
    print(f"greedy: {text!r} ({len(good)} of {len(words)} words from the corpus)")
    assert len(words) >= 8 and len(good) >= 0.8 * len(words)


@pytest.mark.skipif(platform.python_version() != demo.training_record()["python"],
                    reason="the corpus is this Python's own documentation; the bundled model "
                           "was trained on another version's")
def test_corpus_and_tokenizer_are_reproduced(tmp_path, corpus, shipped):
    record = demo.training_record()
    import hashlib

    assert hashlib.sha256("\x00".join(corpus).encode()).hexdigest() == record["corpus_sha256"]
    train_docs, held_out = demo_train.split_documents(corpus)
    assert (len(train_docs), len(held_out)) == (record["documents"]["train"],
                                                record["documents"]["held_out"])
    fresh = demo_train.testing.train_tiny_tokenizer(
        vocab_size=demo.DEMO_VOCAB_SIZE, text="\n".join(train_docs))
    with open(demo.demo_tokenizer_path(), "rb") as f:
        assert fresh == f.read()


def test_training_script_runs_end_to_end(tmp_path):
    """Three steps on a slice of the corpus: every file written, the checkpoint loads."""
    record = demo_train.train(str(tmp_path), steps=3, batch=2, length=32, lr=1e-3, seed=0,
                              max_documents=150)
    config, params = checkpoint.load_checkpoint(str(tmp_path / "checkpoint"))
    assert config == demo.DEMO_CONFIG
    assert json.loads((tmp_path / "training.json").read_text()) == record
    assert record["steps"] == 3 and record["tokens_seen"] == 3 * 2 * 32
    assert np.isfinite(record["perplexity"]["held_out"])
    assert tokenizer.load_tokenizer(str(tmp_path / "tokenizer.model")).vocab_size == 2048
