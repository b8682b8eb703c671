"""The bundled demo model: a tiny tokenizer and a tiny RANDOM-weight Griffin checkpoint.

The job uses these when no ``--checkpoint`` is given, so that the whole
pipeline (read prompts, tokenize, generate, detokenize, write results) runs
anywhere without downloading weights. The weights are random: the model
produces fluent-looking gibberish, never meaningful text.

* ``tokenizer.model``: SentencePiece, vocabulary 1024, Gemma-like special ids
  (pad 0, eos 1, bos 2, unk 3, ``<start_of_turn>``, ``<end_of_turn>``), byte
  fallback, trained on ``griffin_batch.model.testing.corpus()``.
* ``checkpoint/``: Hugging Face format (``config.json`` + ``model.safetensors``,
  bfloat16): width 128, 6 blocks (recurrent, recurrent, attention) x 2, 4 heads,
  MLP 384, attention window 128, logits soft-cap 30.

Both are regenerated bit for bit by ``python -m griffin_batch.model.demo`` (see
``write_demo_assets``).
"""

from __future__ import annotations

import os

import ml_dtypes

from griffin_batch.model import checkpoint, testing
from griffin_batch.model.config import GriffinConfig, griffin_pattern

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
DEMO_VOCAB_SIZE = 1024
DEMO_SEED = 0
DEMO_CONFIG = GriffinConfig(
    vocab_size=DEMO_VOCAB_SIZE,
    width=128,
    mlp_expanded_width=384,
    num_heads=4,
    lru_width=128,
    block_types=griffin_pattern(6),
    embeddings_scale_by_sqrt_dim=True,
    attention_window_size=128,
    logits_soft_cap=30.0,
)


def demo_checkpoint_path() -> str:
    """Path of the bundled random-weight checkpoint directory (Hugging Face format)."""
    return os.path.join(DEMO_DIR, "checkpoint")


def demo_tokenizer_path() -> str:
    """Path of the bundled SentencePiece model."""
    return os.path.join(DEMO_DIR, "tokenizer.model")


def write_demo_assets(directory: str = DEMO_DIR) -> None:
    """Deterministically (re)writes ``tokenizer.model`` and ``checkpoint/`` into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    testing.train_tiny_tokenizer(
        os.path.join(directory, "tokenizer.model"),
        vocab_size=DEMO_VOCAB_SIZE,
        text=testing.corpus(num_sentences=6000, seed=DEMO_SEED),
    )
    params = testing.random_params(DEMO_CONFIG, seed=DEMO_SEED, dtype=ml_dtypes.bfloat16)
    checkpoint.save_checkpoint(
        os.path.join(directory, "checkpoint"),
        DEMO_CONFIG,
        params,
        format=checkpoint.HF,
        overwrite=True,
    )


if __name__ == "__main__":
    write_demo_assets()
    for root, _, files in os.walk(DEMO_DIR):
        for name in sorted(files):
            path = os.path.join(root, name)
            print(f"{os.path.getsize(path):>10,d}  {os.path.relpath(path, DEMO_DIR)}")
