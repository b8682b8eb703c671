"""Griffin / RecurrentGemma in JAX + Flax: config, model, checkpoints, tokenizer, engine.

Public surface (other tools call these exact names):

* ``load_checkpoint(path, *, preset=None, dtype=None) -> (GriffinConfig, params)``
* ``forward_logits(config, params, tokens, *, chunk_size=None) -> [b, t, v] float32``
* ``load_tokenizer(path) -> Tokenizer``
* ``sample(config, params, tokenizer, prompts, *, max_tokens, ...) -> list[Completion]``

Attributes resolve lazily so ``import griffin_batch.model`` stays cheap and cycle-free.
"""

import importlib

_EXPORTS = {
    "GriffinConfig": ("griffin_batch.model.config", "GriffinConfig"),
    "Preset": ("griffin_batch.model.config", "Preset"),
    "forward_logits": ("griffin_batch.model.griffin", "forward_logits"),
    "init_params": ("griffin_batch.model.griffin", "init_params"),
    "init_cache": ("griffin_batch.model.griffin", "init_cache"),
    "load_checkpoint": ("griffin_batch.model.checkpoint", "load_checkpoint"),
    "save_checkpoint": ("griffin_batch.model.checkpoint", "save_checkpoint"),
    "load_tokenizer": ("griffin_batch.model.tokenizer", "load_tokenizer"),
    "Tokenizer": ("griffin_batch.model.tokenizer", "Tokenizer"),
    "Engine": ("griffin_batch.model.engine", "Engine"),
    "EngineConfig": ("griffin_batch.model.engine_config", "EngineConfig"),
    "sample": ("griffin_batch.model.engine", "sample"),
    "SamplingParams": ("griffin_batch.model.requests", "SamplingParams"),
    "Request": ("griffin_batch.model.requests", "Request"),
    "Completion": ("griffin_batch.model.requests", "Completion"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'griffin_batch.model' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
