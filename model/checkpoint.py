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
  ``RecurrentGemmaForCausalLM`` names them.

Paths are local or any fsspec URL. Errors name the file, the parameter and the
expected shape so that a bad checkpoint is diagnosed from the message alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import fsspec
import ml_dtypes
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
# transformers' RecurrentGemma settings our model implements; anything else is refused.
_HF_FIXED = {
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "attention_bias": False,
}
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
)
# transformers' defaults for fields a config.json may omit.
_HF_DEFAULTS = {"attention_window_size": 2048, "logits_soft_cap": 30.0, "conv1d_width": 4}

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

    fs, root = fsspec.core.url_to_fs(path)
    fmt = detect_format(path)
    preset = None if preset is None else Preset.parse(preset)
    if fmt == ORBAX:
        config, flat = _load_orbax(fs, root, path, preset)
    else:
        config, flat = _load_hf(fs, root, path, preset)
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
        fs.makedirs(root, exist_ok=True)
        _write_json(fs, _join(root, CONFIG_JSON), hf_config_dict(config, _common_dtype(flat)))
        _write_safetensors(fs, _join(root, "model.safetensors"), params_to_hf(config, flat))
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
# Hugging Face (transformers RecurrentGemmaForCausalLM).


def hf_config_dict(config: GriffinConfig, dtype: str = "float32") -> dict[str, Any]:
    """transformers' RecurrentGemmaConfig fields describing ``config``."""
    if not config.embeddings_scale_by_sqrt_dim:
        raise CheckpointError(
            "transformers' RecurrentGemma always scales embeddings by sqrt(width); a config with "
            "embeddings_scale_by_sqrt_dim=False cannot be saved in the hf format"
        )
    if config.logits_soft_cap <= 0:
        raise CheckpointError(
            "transformers' RecurrentGemma always soft-caps logits; "
            "logits_soft_cap must be > 0 for the hf format"
        )
    return {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": "recurrent_gemma",
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": 2 * config.mlp_expanded_width,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": 1,
        "num_hidden_layers": config.num_layers,
        "lru_width": config.effective_lru_width,
        "block_types": list(config.block_types),
        "attention_window_size": config.attention_window_size,
        "conv1d_width": config.conv1d_width,
        "logits_soft_cap": float(config.logits_soft_cap),
        **_HF_FIXED,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "torch_dtype": dtype,
    }


def _fields_from_hf_config(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """GriffinConfig fields declared by transformers' config.json; refuses what we don't implement."""

    def get(key, default=None):
        if key in cfg and cfg[key] is not None:
            return cfg[key]
        rope = cfg.get("rope_parameters") or {}
        return rope.get(key, default)

    for key, want in _HF_FIXED.items():
        have = get(key, want)
        if have != want and not (isinstance(want, float) and np.isclose(float(have), want)):
            raise CheckpointError(f"{source}: {key}={have!r} is not supported (only {want!r})")
    rope_type = get("rope_type", "default")
    if rope_type != "default":
        raise CheckpointError(
            f"{source}: rope_type={rope_type!r} is not supported (only 'default')"
        )
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads", heads)
    if kv_heads != 1 and heads != 1:
        raise CheckpointError(
            f"{source}: num_key_value_heads={kv_heads} is not supported; Griffin attention has "
            f"one shared key/value head (num_key_value_heads=1)"
        )
    missing = [k for k in _HF_REQUIRED if get(k) is None]
    if missing:
        raise CheckpointError(f"{source}: missing {missing}")
    pattern = list(get("block_types", ("recurrent", "recurrent", "attention")))
    layers = get("num_hidden_layers")
    fields = {
        "vocab_size": get("vocab_size"),
        "width": get("hidden_size"),
        "mlp_expanded_width": get("intermediate_size") // 2,
        "num_heads": heads,
        "lru_width": get("lru_width") or get("hidden_size"),
        "block_types": tuple((pattern * layers)[:layers]),
        "embeddings_scale_by_sqrt_dim": True,
        **{k: get(k, default) for k, default in _HF_DEFAULTS.items()},
    }
    fields["logits_soft_cap"] = float(fields["logits_soft_cap"])
    return fields


# Reference leaf <- transformers tensor: (reference path, hf suffix, to_reference, to_hf).
_T = (lambda x: x.T, lambda x: x.T)
_SAME = (lambda x: x, lambda x: x)
_CONV = (lambda x: x[:, 0, :].T, lambda x: x.T[:, None, :])


def _linear(ref: str, hf: str, bias: bool = True):
    out = [(f"{ref}/kernel", f"{hf}.weight", *_T)]
    return [*out, (f"{ref}/bias", f"{hf}.bias", *_SAME)] if bias else out


_HF_COMMON = [
    ("temporal_pre_norm/scale", "temporal_pre_norm.weight", *_SAME),
    ("channel_pre_norm/scale", "channel_pre_norm.weight", *_SAME),
    *_linear("mlp_block/ffw_down", "mlp_block.down_proj"),
]
_HF_RECURRENT = [
    *_linear("recurrent_block/linear_x", "temporal_block.linear_x"),
    *_linear("recurrent_block/linear_y", "temporal_block.linear_y"),
    *_linear("recurrent_block/linear_out", "temporal_block.linear_out"),
    ("recurrent_block/conv_1d/w", "temporal_block.conv_1d.weight", *_CONV),
    ("recurrent_block/conv_1d/b", "temporal_block.conv_1d.bias", *_SAME),
    ("recurrent_block/rg_lru/a_param", "temporal_block.rg_lru.recurrent_param", *_SAME),
    ("recurrent_block/rg_lru/input_gate/w", "temporal_block.rg_lru.input_gate_weight", *_SAME),
    ("recurrent_block/rg_lru/input_gate/b", "temporal_block.rg_lru.input_gate_bias", *_SAME),
    ("recurrent_block/rg_lru/a_gate/w", "temporal_block.rg_lru.recurrent_gate_weight", *_SAME),
    ("recurrent_block/rg_lru/a_gate/b", "temporal_block.rg_lru.recurrent_gate_bias", *_SAME),
]
_HF_ATTENTION = [
    *_linear("attention_block/proj_q", "temporal_block.q_proj", bias=False),
    *_linear("attention_block/proj_k", "temporal_block.k_proj", bias=False),
    *_linear("attention_block/proj_v", "temporal_block.v_proj", bias=False),
    *_linear("attention_block/proj_final", "temporal_block.o_proj"),
]
# The reference fuses gate and up projections into ffw_up: w [2, d, m], b [2, 1, 1, m].
_HF_MLP_IN = ("mlp_block.gate_proj", "mlp_block.up_proj")


def _hf_rules(config: GriffinConfig) -> Iterator[tuple[str, str, Callable, Callable]]:
    """(reference path, hf name without "model.", to_reference, to_hf) for each 1:1 leaf."""
    yield ("embedder/input_embedding", "embed_tokens.weight", *_SAME)
    yield ("final_norm/scale", "final_norm.weight", *_SAME)
    for i, block_type in enumerate(config.block_types):
        rules = _HF_COMMON + (_HF_RECURRENT if block_type == RECURRENT else _HF_ATTENTION)
        for ref, hf, to_ref, to_hf in rules:
            yield f"blocks.{i}/{ref}", f"layers.{i}.{hf}", to_ref, to_hf


def hf_shapes(config: GriffinConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of transformers' tensors (names without the "model." prefix) for ``config``."""
    ref = dict(_flatten(param_shapes(config)))
    shapes = {}
    for ref_path, hf, _, to_hf in _hf_rules(config):
        shapes[hf] = to_hf(np.empty(ref[ref_path], np.int8)).shape
    for i in range(config.num_layers):
        for name in _HF_MLP_IN:
            shapes[f"layers.{i}.{name}.weight"] = (config.mlp_expanded_width, config.width)
            shapes[f"layers.{i}.{name}.bias"] = (config.mlp_expanded_width,)
    return shapes


def params_to_hf(config: GriffinConfig, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat reference params -> transformers tensors ("model."-prefixed, lm_head tied)."""
    out = {}
    for ref, hf, _, to_hf in _hf_rules(config):
        out[f"model.{hf}"] = np.ascontiguousarray(to_hf(np.asarray(flat[ref])))
    for i in range(config.num_layers):
        w = np.asarray(flat[f"blocks.{i}/mlp_block/ffw_up/w"])
        b = np.asarray(flat[f"blocks.{i}/mlp_block/ffw_up/b"])
        for k, name in enumerate(_HF_MLP_IN):
            out[f"model.layers.{i}.{name}.weight"] = np.ascontiguousarray(w[k].T)
            out[f"model.layers.{i}.{name}.bias"] = np.ascontiguousarray(b[k].reshape(-1))
    return out


def _infer_hf_shape_fields(files: Mapping[str, _SafetensorsFile], prefix: str, source: str):
    """Shape fields from the tensors themselves, to cross-check config.json."""
    shapes = {
        name[len(prefix) :]: f.header[name]["shape"]
        for f in files.values()
        for name in f.names
        if name.startswith(prefix)
    }
    if "embed_tokens.weight" not in shapes:
        raise CheckpointError(f"{source}: no {prefix}embed_tokens.weight in the safetensors files")
    vocab_size, width = shapes["embed_tokens.weight"]
    fields: dict[str, Any] = dict(vocab_size=vocab_size, width=width)
    if "layers.0.mlp_block.down_proj.weight" in shapes:
        fields["mlp_expanded_width"] = shapes["layers.0.mlp_block.down_proj.weight"][1]
    block_types = []
    while f"layers.{len(block_types)}.temporal_pre_norm.weight" in shapes:
        i = len(block_types)
        gate = shapes.get(f"layers.{i}.temporal_block.rg_lru.recurrent_gate_weight")
        k_proj = shapes.get(f"layers.{i}.temporal_block.k_proj.weight")
        if gate is not None:
            block_types.append(RECURRENT)
            fields.setdefault("lru_width", gate[0] * gate[1])
            fields.setdefault("num_heads", gate[0])
        elif k_proj is not None:
            block_types.append(ATTENTION)
        else:
            raise CheckpointError(f"{source}: layers.{i} has neither rg_lru nor k_proj tensors")
    fields["block_types"] = tuple(block_types)
    return fields


def _load_hf(
    fs: fsspec.AbstractFileSystem, root: str, path: str, preset: Preset | None
) -> tuple[GriffinConfig, dict[str, np.ndarray]]:
    files = {
        name: _SafetensorsFile(fs, _join(root, name), f"{path}/{name}")
        for name in _hf_weight_files(fs, root, path)
    }
    all_names = {n for f in files.values() for n in f.names}
    prefix = "model." if "model.embed_tokens.weight" in all_names else ""
    inferred = _infer_hf_shape_fields(files, prefix, path)
    declared = None
    if fs.exists(_join(root, CONFIG_JSON)):
        declared = _fields_from_hf_config(
            _read_json(fs, _join(root, CONFIG_JSON)), f"{path}/{CONFIG_JSON}"
        )
        if "num_heads" not in inferred:  # pure attention: head count needs the config
            inferred["num_heads"] = declared["num_heads"]
    elif "num_heads" not in inferred and preset is not None:
        inferred["num_heads"] = preset.config().num_heads
    config = resolve_config(inferred, declared, preset, source=path)

    where = {n: f for f in files.values() for n in f.names}
    expected = {f"{prefix}{k}": v for k, v in hf_shapes(config).items()}
    for name, shape in expected.items():
        if name not in where:
            raise CheckpointError(
                f"{path}: missing tensor {name} (expected shape {shape}) in {sorted(files)}"
            )
        got = tuple(where[name].header[name]["shape"])
        if got != shape:
            raise CheckpointError(
                f"{where[name].source}: tensor {name} has shape {got}, expected {shape} for "
                f"{_describe(config)}"
            )
    extra = sorted(set(where) - set(expected) - {"lm_head.weight"})
    if extra:
        raise CheckpointError(
            f"{where[extra[0]].source}: unexpected tensor {extra[0]} with shape "
            f"{tuple(where[extra[0]].header[extra[0]]['shape'])} for {_describe(config)}"
        )

    tensors: dict[str, np.ndarray] = {}
    for f in files.values():
        tensors.update(f.read_all())
    read = lambda name: tensors.pop(f"{prefix}{name}")  # noqa: E731
    flat = {ref: to_ref(read(hf)) for ref, hf, to_ref, _ in _hf_rules(config)}
    for i in range(config.num_layers):
        w = [read(f"layers.{i}.{n}.weight").T for n in _HF_MLP_IN]
        b = [read(f"layers.{i}.{n}.bias") for n in _HF_MLP_IN]
        flat[f"blocks.{i}/mlp_block/ffw_up/w"] = np.stack(w)
        flat[f"blocks.{i}/mlp_block/ffw_up/b"] = np.stack(b).reshape(2, 1, 1, -1)
    if "lm_head.weight" in tensors:
        lm_head = tensors.pop("lm_head.weight")
        if not np.array_equal(lm_head, flat["embedder/input_embedding"]):
            raise CheckpointError(
                f"{where['lm_head.weight'].source}: lm_head.weight differs from the input "
                f"embedding; Griffin ties them and cannot load an untied output layer"
            )
    return config, {k: np.ascontiguousarray(v) for k, v in flat.items()}


def _hf_weight_files(fs, root: str, path: str) -> list[str]:
    index_path = _join(root, HF_INDEX_JSON)
    if fs.exists(index_path):
        weight_map = _read_json(fs, index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}/{HF_INDEX_JSON}: no weight_map")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not fs.exists(_join(root, name)):
                raise CheckpointError(f"{path}/{HF_INDEX_JSON} lists {name}, which does not exist")
        return names
    names = sorted(
        os.path.basename(p) for p in fs.ls(root, detail=False) if p.endswith(".safetensors")
    )
    if not names:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return names


# ----------------------------------------------------------------------------------------------
# safetensors through fsspec (NumPy's safetensors module has no bfloat16).

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class _SafetensorsFile:
    """Header of one .safetensors file; tensors are read one at a time by byte range."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, source: str):
        self.fs, self.path, self.source = fs, path, source
        with fs.open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{source}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{source}: not a safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"{source}: not a safetensors file ({e})") from None
        header.pop("__metadata__", None)
        for name, info in header.items():
            if info.get("dtype") not in _ST_DTYPES:
                raise CheckpointError(
                    f"{source}: tensor {name} has unsupported dtype {info.get('dtype')}"
                )
        self.header = header
        self.data_start = 8 + n

    @property
    def names(self) -> list[str]:
        return list(self.header)

    def read_all(self) -> dict[str, np.ndarray]:
        """All tensors, read in file order through one handle (one pass over remote files)."""
        out = {}
        with self.fs.open(self.path, "rb") as f:
            for name, info in sorted(self.header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]
                dtype = _ST_DTYPES[info["dtype"]]
                if end - begin != dtype.itemsize * math.prod(info["shape"]):
                    raise CheckpointError(
                        f"{self.source}: tensor {name} has {end - begin} bytes, but shape "
                        f"{info['shape']} of {info['dtype']} needs "
                        f"{dtype.itemsize * math.prod(info['shape'])}"
                    )
                f.seek(self.data_start + begin)
                buf = f.read(end - begin)
                if len(buf) != end - begin:
                    raise CheckpointError(f"{self.source}: file is truncated inside tensor {name}")
                out[name] = np.frombuffer(buf, dtype.newbyteorder("<")).reshape(info["shape"])
        return out


def _write_safetensors(fs, path: str, tensors: Mapping[str, np.ndarray]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _ST_NAMES:
            raise CheckpointError(f"tensor {name}: dtype {a.dtype} cannot be stored in safetensors")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": _ST_NAMES[a.dtype.newbyteorder("=")],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section aligned to 8 bytes, as safetensors writes it
    with fs.open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())


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


def _common_dtype(flat: Mapping[str, np.ndarray]) -> str:
    dtypes = {np.asarray(v).dtype.name for v in flat.values()}
    return dtypes.pop() if len(dtypes) == 1 else "float32"
