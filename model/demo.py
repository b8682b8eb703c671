"""The bundled demo model: a small Griffin trained on the documentation that ships with Python.

The job uses it when no ``--checkpoint`` is given, so that the whole pipeline
(read prompts, tokenize, generate, detokenize, write results) runs anywhere
without downloading weights, and writes readable (if not always sensible)
English about Python.

* ``tokenizer.model``: SentencePiece, vocabulary 2048, Gemma-like special ids
  (pad 0, eos 1, bos 2, unk 3, ``<start_of_turn>``, ``<end_of_turn>``), byte
  fallback, trained on the corpus below.
* ``checkpoint/``: Hugging Face format (``config.json`` + ``model.safetensors``,
  bfloat16): ``DEMO_CONFIG``, about 2.2M parameters.
* ``training.json``: the training run (corpus hash, steps, time, held-out perplexity).

``python -m griffin_batch.model.demo_train`` rewrites all three (see there for
the corpus: the language reference's topics and the standard library's docstrings).
"""

from __future__ import annotations

import json
import os
from typing import Any

from griffin_batch.model.config import GriffinConfig, griffin_pattern

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
DEMO_VOCAB_SIZE = 2048
DEMO_SEED = 0
DEMO_TRAIN_STEPS = 1500
"""Optimizer steps of ``python -m griffin_batch.model.demo_train`` (16 x 256 tokens each)."""
DEMO_CONFIG = GriffinConfig(
    vocab_size=DEMO_VOCAB_SIZE,
    width=160,
    mlp_expanded_width=480,
    num_heads=4,
    lru_width=160,
    block_types=griffin_pattern(6),
    embeddings_scale_by_sqrt_dim=True,
    attention_window_size=128,
    logits_soft_cap=30.0,
)


def demo_checkpoint_path() -> str:
    """Path of the bundled checkpoint directory (Hugging Face format)."""
    return os.path.join(DEMO_DIR, "checkpoint")


def demo_tokenizer_path() -> str:
    """Path of the bundled SentencePiece model."""
    return os.path.join(DEMO_DIR, "tokenizer.model")


def training_record() -> dict[str, Any]:
    """The bundled model's ``training.json`` (what ``demo_train`` measured when it made it)."""
    with open(os.path.join(DEMO_DIR, "training.json")) as f:
        return json.load(f)
