"""The entry points: detect a checkpoint's format and dispatch to its module.

This is the only module that knows both formats; each format module knows
only ``common``. Loading checks every parameter on the host before anything
is copied to a device.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
import numpy as np

from griffin_batch.model.checkpoint import common, hf_format, orbax_format
from griffin_batch.model.checkpoint.common import CheckpointError
from griffin_batch.model.config import GriffinConfig, Preset

ORBAX = "orbax"
HF = "hf"
FORMATS = (ORBAX, HF)

# Format name -> its module; each module has the same load(...) and save(...) signatures.
_MODULES = {ORBAX: orbax_format, HF: hf_format}


def load_checkpoint(
    path: str, *, preset: str | Preset | None = None, dtype: Any = None
) -> tuple[GriffinConfig, common.Params]:
    """Loads an orbax or Hugging Face checkpoint into the reference parameter tree.

    Args:
      path: Checkpoint directory, local or an fsspec URL (gs://, s3://, memory://...).
      preset: Expected preset (name or ``Preset``). Supplies hyper-parameters
        missing from the checkpoint; any value the checkpoint also has must agree.
      dtype: Cast every parameter to this dtype ("float32", "bfloat16", a jnp
        dtype); None keeps the stored dtypes.

    Returns:
      ``(config, params)`` with params a nested dict of jax arrays.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointError: Unknown format, missing hyper-parameters, a preset
        mismatch, or a missing, unexpected or mis-shaped parameter.
    """
    # Imported here, not at the top: jax is heavy, and importing this package stays cheap for
    # code that only names formats or shapes (the job driver, the demo paths).
    import jax.numpy as jnp

    fs, root = fsspec.core.url_to_fs(path)
    fmt = detect_format(path)
    preset = None if preset is None else Preset.parse(preset)
    config, flat = _MODULES[fmt].load(fs, root, path, preset)
    # On the host, before any device copy: a bad checkpoint fails without touching accelerators.
    common.check_params(config, common.unflatten(flat), source=path)
    target = None if dtype is None else jnp.dtype(dtype)
    return config, common.unflatten(
        {k: jnp.asarray(v if target is None else v.astype(target)) for k, v in flat.items()}
    )


def save_checkpoint(
    path: str,
    config: GriffinConfig,
    params: common.Params,
    *,
    format: str = ORBAX,
    overwrite: bool = False,
) -> None:
    """Writes ``params`` (reference tree) and ``config`` as an orbax or Hugging Face checkpoint.

    Args:
      path: Target directory, local or an fsspec URL.
      config: The model config.
      params: Reference parameter tree (jax or NumPy arrays).
      format: "orbax" (tree ``{"params": params}`` plus our ``config.json``) or
        "hf" (transformers' ``config.json`` plus ``model.safetensors``).
      overwrite: Replace an existing directory instead of raising.

    Raises:
      ValueError: Unknown ``format``.
      CheckpointError: ``params`` do not match ``config``, or the format cannot
        express ``config``.
      FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    # Checked before anything is removed: a bad format must not cost an existing checkpoint.
    if format not in _MODULES:
        raise ValueError(f"unknown checkpoint format {format!r}; expected {ORBAX!r} or {HF!r}")
    common.check_params(config, params, source="save_checkpoint(params)")
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(root):
        if not overwrite:
            raise FileExistsError(f"checkpoint {path} already exists; pass overwrite=True")
        fs.rm(root, recursive=True)
    flat = {k: np.asarray(v) for k, v in common.flatten(params)}
    _MODULES[format].save(fs, root, config, flat)


def detect_format(path: str) -> str:
    """The format of the checkpoint directory at ``path``, from the names of its files.

    Args:
      path: Checkpoint directory, local or an fsspec URL.

    Returns:
      ``HF`` ("hf") if it holds safetensors files or their index, else ``ORBAX``
      ("orbax") if it holds orbax's metadata files.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointError: ``path`` is a file, or a directory of neither format.
    """
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not fs.isdir(root):
        raise CheckpointError(f"checkpoint {path} is a file; expected a checkpoint directory")
    names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    # Checked first: any safetensors file (or index) makes a directory Hugging Face.
    if hf_format.matches(names):
        return HF
    if orbax_format.matches(names):
        return ORBAX
    raise CheckpointError(
        f"checkpoint {path}: unknown format; found {names or 'an empty directory'}, expected an "
        f"orbax checkpoint (one of {list(orbax_format.MARKERS)}) or a Hugging Face checkpoint "
        f"({common.CONFIG_JSON} and *.safetensors)"
    )
