"""Griffin / RecurrentGemma in JAX + Flax: config, model, checkpoints, tokenizer, engine.

Public surface (other tools call these exact names):

* ``load_checkpoint(path, *, preset=None, dtype=None) -> (GriffinConfig, params)``
* ``forward_logits(config, params, tokens, *, chunk_size=None) -> [b, t, v] float32``
* ``load_tokenizer(path) -> Tokenizer``
* ``sample(config, params, tokenizer, prompts, *, max_tokens, ...) -> list[Completion]``

Attributes resolve lazily so ``import model`` stays cheap and cycle-free.
"""

import importlib

_EXPORTS = {
    "GriffinConfig": ("model.config", "GriffinConfig"),
    "Preset": ("model.config", "Preset"),
    "forward_logits": ("model.griffin", "forward_logits"),
    "init_params": ("model.griffin", "init_params"),
    "init_cache": ("model.griffin", "init_cache"),
    "load_checkpoint": ("model.checkpoint", "load_checkpoint"),
    "save_checkpoint": ("model.checkpoint", "save_checkpoint"),
    "load_tokenizer": ("model.tokenizer", "load_tokenizer"),
    "Tokenizer": ("model.tokenizer", "Tokenizer"),
    "Engine": ("model.engine", "Engine"),
    "EngineConfig": ("model.engine", "EngineConfig"),
    "sample": ("model.engine", "sample"),
    "SamplingParams": ("model.requests", "SamplingParams"),
    "Request": ("model.requests", "Request"),
    "Completion": ("model.requests", "Completion"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'model' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
