"""Griffin / RecurrentGemma in JAX + Flax: config, model, checkpoints, tokenizer, engine.

Public surface (other tools call these exact names):

* ``load_checkpoint(path, *, preset=None, dtype=None) -> (GriffinConfig, params)``
* ``forward_logits(config, params, tokens, *, chunk_size=None) -> [b, t, v] float32``
* ``load_tokenizer(path) -> Tokenizer``
* ``sample(config, params, tokenizer, prompts, *, max_tokens, ...) -> list[Completion]``

Attributes resolve lazily so ``import griffin_batch.model`` stays cheap and cycle-free.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "config": ["GriffinConfig", "Preset"],
    "griffin": ["forward_logits", "init_params", "init_cache"],
    "checkpoint": ["load_checkpoint", "save_checkpoint"],
    "tokenizer": ["load_tokenizer", "Tokenizer"],
    "engine": ["Engine", "sample"],
    "engine_config": ["EngineConfig"],
    "requests": ["SamplingParams", "Request", "Completion"],
})
