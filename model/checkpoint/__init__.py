"""Loading and saving Griffin checkpoints: the official orbax format and Hugging Face safetensors.

Both formats load into the reference Flax parameter tree (``embedder``,
``blocks.{i}``, ``final_norm``; see ``param_shapes``) plus a ``GriffinConfig``:

* orbax (``ORBAX``): a directory written by ``recurrentgemma.jax.utils.save_parameters``
  (or any ``PyTreeCheckpointer`` save of the tree, with or without a top-level
  "params" key). Shape fields of the config come from the parameters; the
  other hyper-parameters from a ``config.json`` beside it (``GriffinConfig``
  field names) or from a preset.
* hf (``HF``): a directory with transformers' ``config.json`` and ``*.safetensors``
  (one file or shards listed in ``model.safetensors.index.json``), named as
  ``RecurrentGemmaForCausalLM`` names them.

Paths are local or any fsspec URL. Errors name the file, the parameter and the
expected shape so that a bad checkpoint is diagnosed from the message alone.

Layout: ``api`` detects the format and dispatches; ``orbax_format`` and
``hf_format`` each implement one format on top of ``common`` (parameter tree,
config inference, errors, fsspec helpers) and never import each other.
"""

from griffin_batch.model.checkpoint.api import (
    FORMATS,
    HF,
    ORBAX,
    detect_format,
    load_checkpoint,
    save_checkpoint,
)
from griffin_batch.model.checkpoint.common import (
    CONFIG_JSON,
    CheckpointError,
    Params,
    check_params,
    infer_shape_fields,
    param_shapes,
)
from griffin_batch.model.checkpoint.hf_format import HF_INDEX_JSON

__all__ = [
    "CONFIG_JSON",
    "FORMATS",
    "HF",
    "HF_INDEX_JSON",
    "ORBAX",
    "CheckpointError",
    "Params",
    "check_params",
    "detect_format",
    "infer_shape_fields",
    "load_checkpoint",
    "param_shapes",
    "save_checkpoint",
]
