"""Loading and saving Griffin checkpoints: the official orbax format and Hugging Face safetensors.

Both formats load into the reference Flax parameter tree (``embedder``,
``blocks.{i}``, ``final_norm``; see ``param_shapes``) plus a ``GriffinConfig``:

* orbax: a directory written by ``recurrentgemma.jax.utils.save_parameters`` (or
  any ``PyTreeCheckpointer`` save of the tree, with or without a top-level
  "params" key). Shape fields of the config come from the parameters; the
  other hyper-parameters from a ``config.json`` beside it (``GriffinConfig``
  field names) or from a preset.
* hf: a directory with transformers' ``config.json`` and ``*.safetensors``
  (one file or shards listed in ``model.safetensors.index.json``), named as
  ``RecurrentGemmaForCausalLM`` names them. The conversion and the safetensors
  I/O live in ``model.hf_checkpoint``; this module dispatches to it.

Paths are local or any fsspec URL. Errors name the file, the parameter and the
expected shape so that a bad checkpoint is diagnosed from the message alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
import numpy as np

from model.config import ATTENTION, RECURRENT, GriffinConfig, Preset

ORBAX = "orbax"
HF = "hf"
CONFIG_JSON = "config.json"
HF_INDEX_JSON = "model.safetensors.index.json"
# Files any orbax PyTree checkpoint (old msgpack or current OCDBT layout) has at its root.
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "checkpoint", "manifest.ocdbt")
# Hyper-parameters that parameter shapes cannot tell.
_HYPER_FIELDS = ("embeddings_scale_by_sqrt_dim", "attention_window_size", "logits_soft_cap")

Params = dict[str, Any]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config."""


# ----------------------------------------------------------------------------------------------
# The reference parameter tree.


def param_shapes(config: GriffinConfig) -> dict[str, Any]:
    """Shapes of the reference Flax parameter tree for ``config`` (nested dict of tuples)."""
    d, m, v = config.width, config.mlp_expanded_width, config.vocab_size
    e, n, hd = config.effective_lru_width, config.num_heads, config.head_dim
    linear = lambda i, o: {"kernel": (i, o), "bias": (o,)}  # noqa: E731
    gate = {"w": (n, e // n, e // n), "b": (n, e // n)}
    tree: dict[str, Any] = {"embedder": {"input_embedding": (v, d)}, "final_norm": {"scale": (d,)}}
    for i, block_type in enumerate(config.block_types):
        block: dict[str, Any] = {
            "temporal_pre_norm": {"scale": (d,)},
            "channel_pre_norm": {"scale": (d,)},
            "mlp_block": {"ffw_up": {"w": (2, d, m), "b": (2, 1, 1, m)}, "ffw_down": linear(m, d)},
        }
        if block_type == RECURRENT:
            block["recurrent_block"] = {
                "linear_x": linear(d, e),
                "linear_y": linear(d, e),
                "linear_out": linear(e, d),
                "conv_1d": {"w": (config.conv1d_width, e), "b": (e,)},
                "rg_lru": {"a_param": (e,), "input_gate": dict(gate), "a_gate": dict(gate)},
            }
        else:
            block["attention_block"] = {
                "proj_q": {"kernel": (d, d)},
                "proj_k": {"kernel": (d, hd)},
                "proj_v": {"kernel": (d, hd)},
                "proj_final": linear(d, d),
            }
        tree[f"blocks.{i}"] = block
    return tree


def check_params(config: GriffinConfig, params: Params, *, source: str) -> None:
    """Raises CheckpointError naming the first missing, unexpected or mis-shaped parameter."""
    expected = dict(_flatten(param_shapes(config)))
    got = dict(_flatten(params))
    for key, shape in expected.items():
        if key not in got:
            raise CheckpointError(
                f"{source}: missing parameter {key} (expected shape {shape} for {_describe(config)})"
            )
        if tuple(got[key].shape) != shape:
            raise CheckpointError(
                f"{source}: parameter {key} has shape {tuple(got[key].shape)}, expected {shape} "
                f"for {_describe(config)}"
            )
    for key in got:
        if key not in expected:
            raise CheckpointError(
                f"{source}: unexpected parameter {key} with shape {tuple(got[key].shape)}; "
                f"{_describe(config)} has no such parameter"
            )


def _describe(config: GriffinConfig) -> str:
    return (
        f"config(vocab_size={config.vocab_size}, width={config.width}, "
        f"mlp_expanded_width={config.mlp_expanded_width}, num_heads={config.num_heads}, "
        f"lru_width={config.effective_lru_width}, block_types={list(config.block_types)})"
    )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _unflatten(flat: Mapping[str, Any]) -> Params:
    tree: Params = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


# ----------------------------------------------------------------------------------------------
# Public entry points.


def load_checkpoint(
    path: str, *, preset: str | Preset | None = None, dtype: Any = None
) -> tuple[GriffinConfig, Params]:
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
    import jax.numpy as jnp

    # Imported here: hf_checkpoint builds on this module's tree, config and fsspec helpers.
    from model import hf_checkpoint

    fs, root = fsspec.core.url_to_fs(path)
    fmt = detect_format(path)
    preset = None if preset is None else Preset.parse(preset)
    if fmt == ORBAX:
        config, flat = _load_orbax(fs, root, path, preset)
    else:
        config, flat = hf_checkpoint.load(fs, root, path, preset)
    check_params(config, _unflatten(flat), source=path)  # on the host, before any device copy
    target = None if dtype is None else jnp.dtype(dtype)
    return config, _unflatten(
        {k: jnp.asarray(v if target is None else v.astype(target)) for k, v in flat.items()}
    )


def save_checkpoint(
    path: str,
    config: GriffinConfig,
    params: Params,
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
    """
    from model import hf_checkpoint  # see load_checkpoint

    check_params(config, params, source="save_checkpoint(params)")
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(root):
        if not overwrite:
            raise FileExistsError(f"checkpoint {path} already exists; pass overwrite=True")
        fs.rm(root, recursive=True)
    flat = {k: np.asarray(v) for k, v in _flatten(params)}
    if format == ORBAX:
        _save_orbax(fs, root, path, config, flat)
    elif format == HF:
        hf_checkpoint.save(fs, root, config, flat)
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; expected {ORBAX!r} or {HF!r}")


def detect_format(path: str) -> str:
    """Returns "orbax" or "hf" for the checkpoint directory at ``path``."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not fs.isdir(root):
        raise CheckpointError(f"checkpoint {path} is a file; expected a checkpoint directory")
    names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    if any(n.endswith(".safetensors") for n in names) or HF_INDEX_JSON in names:
        return HF
    if any(n in names for n in _ORBAX_MARKERS):
        return ORBAX
    raise CheckpointError(
        f"checkpoint {path}: unknown format; found {names or 'an empty directory'}, expected an "
        f"orbax checkpoint (one of {list(_ORBAX_MARKERS)}) or a Hugging Face checkpoint "
        f"({CONFIG_JSON} and *.safetensors)"
    )


# ----------------------------------------------------------------------------------------------
# Config: shape fields from the parameters, hyper-parameters from config.json or a preset.


def infer_shape_fields(params: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The config fields that the reference parameter tree's shapes determine."""

    def shape(key: str) -> tuple[int, ...]:
        node: Any = params
        for part in key.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                found = sorted(node) if isinstance(node, Mapping) else type(node).__name__
                raise CheckpointError(
                    f"{source}: missing parameter {key} (found {found} at {part!r})"
                )
            node = node[part]
        return tuple(node.shape)

    vocab_size, width = shape("embedder/input_embedding")
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        width=width,
        mlp_expanded_width=shape("blocks.0/mlp_block/ffw_down/kernel")[0],
    )
    block_types, heads = [], {}
    while f"blocks.{len(block_types)}" in params:
        i = len(block_types)
        block = params[f"blocks.{i}"]
        if "recurrent_block" in block:
            block_types.append(RECURRENT)
            n, bw, _ = shape(f"blocks.{i}/recurrent_block/rg_lru/a_gate/w")
            heads[f"blocks.{i}/recurrent_block/rg_lru/a_gate/w"] = n
            fields.setdefault("lru_width", n * bw)
            fields.setdefault("conv1d_width", shape(f"blocks.{i}/recurrent_block/conv_1d/w")[0])
        elif "attention_block" in block:
            block_types.append(ATTENTION)
            head_dim = shape(f"blocks.{i}/attention_block/proj_k/kernel")[1]
            heads[f"blocks.{i}/attention_block/proj_k/kernel"] = width // head_dim
        else:
            raise CheckpointError(
                f"{source}: blocks.{i} has neither recurrent_block nor attention_block "
                f"(keys {sorted(block)})"
            )
    if not block_types:
        raise CheckpointError(f"{source}: no blocks.0 in the parameters (keys {sorted(params)})")
    if len(set(heads.values())) > 1:
        raise CheckpointError(f"{source}: blocks disagree on num_heads: {heads}")
    fields["num_heads"] = next(iter(heads.values()))
    fields["block_types"] = tuple(block_types)
    return fields


def resolve_config(
    inferred: Mapping[str, Any],
    declared: Mapping[str, Any] | None,
    preset: Preset | None,
    *,
    source: str,
) -> GriffinConfig:
    """Merges fields inferred from shapes, a declared config and a preset; disagreements raise.

    Args:
      inferred: Fields determined by parameter shapes (authoritative).
      declared: Fields from the checkpoint's config.json (GriffinConfig names), or None.
      preset: Optional preset; every field it sets must agree with the others.
      source: The checkpoint path, for messages.
    """
    fields = dict(inferred)
    for name, value in (declared or {}).items():
        if name in fields and _norm(name, value, fields) != _norm(name, fields[name], fields):
            raise CheckpointError(
                f"{source}: {name} is {value!r} in {CONFIG_JSON} but the parameters have "
                f"{fields[name]!r}"
            )
        fields.setdefault(name, value)
    if preset is not None:
        preset_fields = dataclasses.asdict(preset.config(vocab_size=fields["vocab_size"]))
        for name, value in preset_fields.items():
            if name in fields and _norm(name, fields[name], fields) != _norm(
                name, value, preset_fields
            ):
                raise CheckpointError(
                    f"{source}: checkpoint does not match preset {preset.value!r}: {name} is "
                    f"{_shown(name, fields[name])} in the checkpoint but {_shown(name, value)} in "
                    f"the preset"
                )
            fields.setdefault(name, value)
    missing = [f for f in _HYPER_FIELDS if f not in fields]
    if missing:
        raise CheckpointError(
            f"{source}: hyper-parameters {missing} are not stored in the checkpoint; pass "
            f"preset= (one of {[p.value for p in Preset]}) or add a {CONFIG_JSON} with them"
        )
    try:
        return GriffinConfig.from_dict(fields, source=source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _norm(name: str, value: Any, fields: Mapping[str, Any]) -> Any:
    """Comparable form: lru_width None means width; block types as lower-case strings."""
    if name == "lru_width":
        return value if value is not None else fields.get("width")
    if name == "block_types":
        return tuple(str(getattr(b, "name", b)).lower() for b in value)
    if name == "logits_soft_cap":
        return float(value)
    return value


def _shown(name: str, value: Any) -> Any:
    return list(_norm(name, value, {})) if name == "block_types" else value


# ----------------------------------------------------------------------------------------------
# orbax.


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & {"file", "local"})


def _orbax_native(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether orbax reads this filesystem itself; otherwise the directory is copied locally."""
    if _is_local(fs):
        return True
    if _protocols(fs) & {"gs", "gcs"}:
        # tensorstore reads gs:// itself but ignores gcsfs's emulator variable; copy then.
        return not (
            os.environ.get("STORAGE_EMULATOR_HOST")
            and not os.environ.get("TENSORSTORE_GCS_HTTP_URL")
        )
    return False


def _load_orbax(
    fs: fsspec.AbstractFileSystem, root: str, path: str, preset: Preset | None
) -> tuple[GriffinConfig, dict[str, np.ndarray]]:
    declared = None
    config_path = _join(root, CONFIG_JSON)
    if fs.exists(config_path):
        declared = _read_json(fs, config_path)
        fields = {f.name for f in dataclasses.fields(GriffinConfig)}
        unknown = sorted(set(declared) - fields)
        if unknown:
            raise CheckpointError(
                f"{path}/{CONFIG_JSON}: unknown fields {unknown}; expected GriffinConfig fields "
                f"{sorted(fields)}"
            )
    if _orbax_native(fs):
        tree = _restore_orbax(os.path.abspath(root) if _is_local(fs) else path)
    else:
        with tempfile.TemporaryDirectory(prefix="griffin-ckpt-") as tmp:
            local = os.path.join(tmp, "ckpt")
            fs.get(root, local, recursive=True)
            tree = _restore_orbax(local)
    if isinstance(tree.get("params"), Mapping):
        tree = tree["params"]
    inferred = infer_shape_fields(tree, source=path)
    config = resolve_config(inferred, declared, preset, source=path)
    return config, {k: np.asarray(v) for k, v in _flatten(tree)}


def _restore_orbax(location: str) -> dict[str, Any]:
    """Restores any PyTree checkpoint as NumPy arrays on the host (no device placement)."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(location)
    metadata = getattr(metadata, "item_metadata", metadata)  # StepMetadata in recent orbax
    metadata = getattr(metadata, "tree", metadata)  # TreeMetadata in recent orbax
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata
    )
    return checkpointer.restore(location, restore_args=restore_args)


def _save_orbax(fs, root: str, path: str, config: GriffinConfig, flat: dict[str, np.ndarray]):
    import orbax.checkpoint as ocp

    tree = {"params": _unflatten(flat)}
    if _is_local(fs):
        ocp.PyTreeCheckpointer().save(os.path.abspath(root), tree)
    else:
        with tempfile.TemporaryDirectory(prefix="griffin-ckpt-") as tmp:
            local = os.path.join(tmp, "ckpt")
            ocp.PyTreeCheckpointer().save(local, tree)
            fs.put(local, root, recursive=True)
    _write_json(fs, _join(root, CONFIG_JSON), config.to_dict())


# ----------------------------------------------------------------------------------------------
# Small fsspec helpers.


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _read_json(fs, path: str) -> dict[str, Any]:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _write_json(fs, path: str, value: Mapping[str, Any]) -> None:
    with fs.open(path, "wb") as f:
        f.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
