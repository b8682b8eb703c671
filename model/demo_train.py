"""Trains the bundled demo model: a small Griffin on the documentation that ships with Python.

    python -m griffin_batch.model.demo_train            # rewrites model/assets/demo/
    python -m griffin_batch.model.demo_train --steps 20 --out /tmp/demo   # a quick try

The corpus is CPython's own English prose, so it is on every machine and nothing
is downloaded: the language reference's topics (``pydoc_data.topics``, what
``help("for")`` prints) and the standard library's longer docstrings. Documents
are split train / held-out by a hash of their text; the held-out perplexity is
measured on the bfloat16 weights that ship. Everything is seeded: the same
Python version gives the same corpus (its SHA-256 is recorded) and the same
checkpoint. ``training.json`` beside the checkpoint records the run.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from griffin_batch.model import checkpoint, demo, griffin, testing

HELD_OUT_EVERY = 20
"""One document in this many (by hash of its text) is held out."""
MIN_DOCSTRING_CHARS = 200
"""Shorter docstrings are mostly signatures and one-liners: too little prose to learn from."""
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo",
                        "__pycache__", "ensurepip", "tkinter"})


def corpus_documents() -> list[str]:
    """This Python's documentation topics and stdlib docstrings, in a fixed order."""
    from pydoc_data import topics

    docs = [topics.topics[name] for name in sorted(topics.topics)]
    lib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                              | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                        docs.append(doc)
    return list(dict.fromkeys(docs))  # a docstring inherited by copy counts once


def split_documents(docs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, held_out): held out where the text's hash falls in one bucket of ``HELD_OUT_EVERY``."""
    train, held_out = [], []
    for d in docs:
        bucket = int.from_bytes(hashlib.sha256(d.encode()).digest()[:4], "little") % HELD_OUT_EVERY
        (held_out if bucket == 0 else train).append(d)
    return train, held_out


def encode(sp: Any, docs: Sequence[str]) -> np.ndarray:
    """One stream: ``<bos> doc <eos>`` for each document, int32."""
    ids: list[int] = []
    for d in docs:
        ids += [sp.bos_id(), *sp.encode(d), sp.eos_id()]
    return np.asarray(ids, np.int32)


def batches(stream: np.ndarray, batch: int, length: int, seed: int) -> Iterator[np.ndarray]:
    """Endless [batch, length + 1] windows at random offsets of ``stream``."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(stream) - length - 1, size=batch)
        yield np.stack([stream[s:s + length + 1] for s in starts])


def _nll(config, params, window: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood of [batch, length + 1] windows."""
    tokens, targets = window[:, :-1], window[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = griffin.apply(config, params, tokens, positions, None)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def perplexity(config, params, stream: np.ndarray, length: int, batch: int = 16) -> float:
    """exp(mean NLL) over consecutive, non-overlapping windows of ``stream``."""
    n = (len(stream) - 1) // length
    windows = np.stack([stream[i * length:i * length + length + 1] for i in range(n)])
    nll = jax.jit(lambda p, w: _nll(config, p, w))
    total = 0.0
    for i in range(0, n, batch):
        chunk = windows[i:i + batch]
        total += float(nll(params, jnp.asarray(chunk))) * len(chunk)
    return math.exp(total / n)


def train(out: str, *, steps: int, batch: int, length: int, lr: float, seed: int,
          max_documents: int | None = None) -> dict:
    """Trains tokenizer and model, writes both into ``out``; returns the run's record.

    ``max_documents`` keeps only the corpus's first documents (a quick try; the
    bundled model uses all of them).
    """
    import sentencepiece as spm

    started = time.perf_counter()
    docs = corpus_documents()[:max_documents]
    train_docs, held_docs = split_documents(docs)
    os.makedirs(out, exist_ok=True)
    tokenizer_path = os.path.join(out, "tokenizer.model")
    proto = testing.train_tiny_tokenizer(
        tokenizer_path, vocab_size=demo.DEMO_VOCAB_SIZE, text="\n".join(train_docs))
    sp = spm.SentencePieceProcessor(model_proto=proto)
    train_stream, held_stream = encode(sp, train_docs), encode(sp, held_docs)
    config = demo.DEMO_CONFIG
    params = griffin.init_params(config, jax.random.key(seed))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps, end_value=lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b2=0.95, weight_decay=0.1))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, window):
        loss, grads = jax.value_and_grad(lambda p: _nll(config, p, window))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_started = time.perf_counter()
    data = batches(train_stream, batch, length, seed)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jnp.asarray(next(data)))
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:5d}  loss {float(loss):.3f}  "
                  f"{time.perf_counter() - train_started:7.1f} s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - train_started

    shipped = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    checkpoint.save_checkpoint(os.path.join(out, "checkpoint"), config, shipped,
                               format=checkpoint.HF, overwrite=True)
    as_f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), shipped)
    record = {
        "python": platform.python_version(),
        "corpus_sha256": hashlib.sha256("\x00".join(docs).encode()).hexdigest(),
        "documents": {"train": len(train_docs), "held_out": len(held_docs)},
        "tokens": {"train": int(train_stream.size), "held_out": int(held_stream.size)},
        "parameters": int(num_params),
        "steps": steps, "batch": batch, "length": length, "lr": lr, "seed": seed,
        "tokens_seen": steps * batch * length,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "perplexity": {
            "train_sample": round(perplexity(config, as_f32, train_stream[:len(held_stream)],
                                             length), 2),
            "held_out": round(perplexity(config, as_f32, held_stream, length), 2),
        },
        "backend": jax.default_backend(),
    }
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default=demo.DEMO_DIR, help="directory to write (default: the bundled one)")
    p.add_argument("--steps", type=int, default=demo.DEMO_TRAIN_STEPS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256, help="tokens per training window")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=demo.DEMO_SEED)
    args = p.parse_args(argv)
    record = train(args.out, steps=args.steps, batch=args.batch, length=args.length,
                   lr=args.lr, seed=args.seed)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
