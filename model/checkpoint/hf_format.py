"""Hugging Face checkpoints: transformers' ``RecurrentGemmaForCausalLM`` in safetensors files.

A directory with transformers' ``config.json`` and ``*.safetensors`` (one file,
or shards listed in ``model.safetensors.index.json``). This module converts
between those tensors and the reference parameter tree of ``common.param_shapes``
and reads and writes the files with the ``safetensors`` library.

Remote fsspec paths (gs://, s3://, memory://...) are copied to a local
temporary directory before reading, because ``safetensors.safe_open`` reads
only local files; writes go to remote paths as one upload.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import fsspec
import numpy as np
import safetensors

from griffin_batch.model.checkpoint import common
from griffin_batch.model.config import ATTENTION, RECURRENT, GriffinConfig, Preset

SAFETENSORS_FILE = "model.safetensors"
# Lists the files of a sharded checkpoint and which tensor each holds.
HF_INDEX_JSON = "model.safetensors.index.json"
# transformers only loads safetensors files whose metadata says "pt".
_METADATA = {"format": "pt"}
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


def matches(names: list[str]) -> bool:
    """Whether a directory holding the files ``names`` (base names) is a Hugging Face checkpoint."""
    return any(n.endswith(".safetensors") for n in names) or HF_INDEX_JSON in names


# ----------------------------------------------------------------------------------------------
# config.json.


def hf_config_dict(config: GriffinConfig, dtype: str = "float32") -> dict[str, Any]:
    """transformers' RecurrentGemmaConfig fields describing ``config``.

    Args:
      config: The model config.
      dtype: Stored parameter dtype, written as ``torch_dtype``.

    Returns:
      The contents of transformers' ``config.json``.

    Raises:
      CheckpointError: ``config`` uses a setting transformers cannot express.
    """
    if not config.embeddings_scale_by_sqrt_dim:
        raise common.CheckpointError(
            "transformers' RecurrentGemma always scales embeddings by sqrt(width); a config with "
            "embeddings_scale_by_sqrt_dim=False cannot be saved in the hf format"
        )
    if config.logits_soft_cap <= 0:
        raise common.CheckpointError(
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
            raise common.CheckpointError(
                f"{source}: {key}={have!r} is not supported (only {want!r})"
            )
    rope_type = get("rope_type", "default")
    if rope_type != "default":
        raise common.CheckpointError(
            f"{source}: rope_type={rope_type!r} is not supported (only 'default')"
        )
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads", heads)
    if kv_heads != 1 and heads != 1:
        raise common.CheckpointError(
            f"{source}: num_key_value_heads={kv_heads} is not supported; Griffin attention has "
            f"one shared key/value head (num_key_value_heads=1)"
        )
    missing = [k for k in _HF_REQUIRED if get(k) is None]
    if missing:
        raise common.CheckpointError(f"{source}: missing {missing}")
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


# ----------------------------------------------------------------------------------------------
# Tensor names and layouts.

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
    ref = dict(common.flatten(common.param_shapes(config)))
    shapes = {}
    for ref_path, hf, _, to_hf in _hf_rules(config):
        shapes[hf] = to_hf(np.empty(ref[ref_path], np.int8)).shape
    for i in range(config.num_layers):
        for name in _HF_MLP_IN:
            shapes[f"layers.{i}.{name}.weight"] = (config.mlp_expanded_width, config.width)
            shapes[f"layers.{i}.{name}.bias"] = (config.mlp_expanded_width,)
    return shapes


def params_to_hf(config: GriffinConfig, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat reference params -> transformers tensors.

    Args:
      config: The model config.
      flat: Reference parameters keyed by "/"-joined path ("blocks.0/mlp_block/...").

    Returns:
      Contiguous NumPy arrays named as transformers names them ("model."-prefixed;
      no lm_head, which is tied to the input embedding).
    """
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


def _params_from_hf(
    config: GriffinConfig, tensors: dict[str, np.ndarray], prefix: str
) -> dict[str, np.ndarray]:
    """transformers tensors (consumed from ``tensors``) -> flat reference params."""
    read = lambda name: tensors.pop(f"{prefix}{name}")  # noqa: E731
    flat = {ref: to_ref(read(hf)) for ref, hf, to_ref, _ in _hf_rules(config)}
    for i in range(config.num_layers):
        w = [read(f"layers.{i}.{n}.weight").T for n in _HF_MLP_IN]
        b = [read(f"layers.{i}.{n}.bias") for n in _HF_MLP_IN]
        flat[f"blocks.{i}/mlp_block/ffw_up/w"] = np.stack(w)
        flat[f"blocks.{i}/mlp_block/ffw_up/b"] = np.stack(b).reshape(2, 1, 1, -1)
    return {k: np.ascontiguousarray(v) for k, v in flat.items()}


def _infer_hf_shape_fields(
    shapes: Mapping[str, tuple[int, ...]], prefix: str, source: str
) -> dict[str, Any]:
    """Shape fields from the tensors themselves, to cross-check config.json."""
    shapes = {name[len(prefix) :]: s for name, s in shapes.items() if name.startswith(prefix)}
    if "embed_tokens.weight" not in shapes:
        raise common.CheckpointError(
            f"{source}: no {prefix}embed_tokens.weight in the safetensors files"
        )
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
            raise common.CheckpointError(
                f"{source}: layers.{i} has neither rg_lru nor k_proj tensors"
            )
    fields["block_types"] = tuple(block_types)
    return fields


# ----------------------------------------------------------------------------------------------
# Loading and saving a checkpoint directory (dispatched to by ``api``).


def load(
    fs: fsspec.AbstractFileSystem, root: str, path: str, preset: Preset | None
) -> tuple[GriffinConfig, dict[str, np.ndarray]]:
    """Reads a Hugging Face checkpoint directory into flat reference parameters.

    Every tensor's name and shape is checked against the config before any
    tensor data is read.

    Args:
      fs: The filesystem holding the checkpoint.
      root: The checkpoint directory on ``fs``.
      path: The checkpoint path as the caller gave it, for messages.
      preset: Optional preset supplying or checking hyper-parameters.

    Returns:
      ``(config, flat)`` with ``flat`` NumPy arrays keyed by "/"-joined reference path.

    Raises:
      CheckpointError: A file that is not safetensors, an unsupported or
        inconsistent config.json, or a missing, unexpected or mis-shaped tensor.
    """
    names = _hf_weight_files(fs, root, path)
    with _local_copies(fs, root, names) as local:
        shards = {name: _Shard(local[name], f"{path}/{name}") for name in names}
        where = {tensor: shard for shard in shards.values() for tensor in shard.shapes}
        prefix = "model." if "model.embed_tokens.weight" in where else ""
        shapes = {tensor: shard.shapes[tensor] for tensor, shard in where.items()}
        config = _resolve_hf_config(
            fs, root, path, preset, _infer_hf_shape_fields(shapes, prefix, path)
        )
        _check_tensors(config, where, prefix, path, sorted(shards))
        tensors = {}
        for shard in shards.values():
            tensors.update(shard.read_all())
    flat = _params_from_hf(config, tensors, prefix)
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and not np.array_equal(lm_head, flat["embedder/input_embedding"]):
        raise common.CheckpointError(
            f"{where['lm_head.weight'].source}: lm_head.weight differs from the input "
            f"embedding; Griffin ties them and cannot load an untied output layer"
        )
    return config, flat


def save(
    fs: fsspec.AbstractFileSystem, root: str, config: GriffinConfig, flat: Mapping[str, np.ndarray]
) -> None:
    """Writes transformers' ``config.json`` and one ``model.safetensors`` into ``root`` on ``fs``.

    Args:
      fs: The target filesystem.
      root: The checkpoint directory on ``fs``; created if missing.
      config: The model config.
      flat: Reference parameters keyed by "/"-joined path, already checked against ``config``.
    """
    dtypes = {np.asarray(v).dtype.name for v in flat.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    hf_config = hf_config_dict(config, dtype)  # refuses configs transformers cannot express
    fs.makedirs(root, exist_ok=True)
    common.write_json(fs, common.join(root, common.CONFIG_JSON), hf_config)
    write_safetensors(fs, common.join(root, SAFETENSORS_FILE), params_to_hf(config, flat))


def _resolve_hf_config(
    fs: fsspec.AbstractFileSystem,
    root: str,
    path: str,
    preset: Preset | None,
    inferred: dict[str, Any],
) -> GriffinConfig:
    """The config from tensor shapes, transformers' config.json (if any) and the preset."""
    declared = None
    config_path = common.join(root, common.CONFIG_JSON)
    if fs.exists(config_path):
        declared = _fields_from_hf_config(
            common.read_json(fs, config_path), f"{path}/{common.CONFIG_JSON}"
        )
        if "num_heads" not in inferred:  # pure attention: head count needs the config
            inferred["num_heads"] = declared["num_heads"]
    elif "num_heads" not in inferred and preset is not None:
        inferred["num_heads"] = preset.config().num_heads
    return common.resolve_config(inferred, declared, preset, source=path)


def _check_tensors(
    config: GriffinConfig, where: Mapping[str, _Shard], prefix: str, path: str, files: list[str]
) -> None:
    """Raises CheckpointError naming the first missing, mis-shaped or unexpected tensor."""
    expected = {f"{prefix}{k}": v for k, v in hf_shapes(config).items()}
    for name, shape in expected.items():
        if name not in where:
            raise common.CheckpointError(
                f"{path}: missing tensor {name} (expected shape {shape}) in {files}"
            )
        got = where[name].shapes[name]
        if got != shape:
            raise common.CheckpointError(
                f"{where[name].source}: tensor {name} has shape {got}, expected {shape} for "
                f"{common.describe_config(config)}"
            )
    extra = sorted(set(where) - set(expected) - {"lm_head.weight"})
    if extra:
        shard = where[extra[0]]
        raise common.CheckpointError(
            f"{shard.source}: unexpected tensor {extra[0]} with shape {shard.shapes[extra[0]]} "
            f"for {common.describe_config(config)}"
        )


def _hf_weight_files(fs: fsspec.AbstractFileSystem, root: str, path: str) -> list[str]:
    """Names of the safetensors files: those in the shard index, else every *.safetensors."""
    index_path = common.join(root, HF_INDEX_JSON)
    if fs.exists(index_path):
        weight_map = common.read_json(fs, index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise common.CheckpointError(f"{path}/{HF_INDEX_JSON}: no weight_map")
        # The index is untrusted: every name is checked before any is looked up, opened or
        # copied, so none can reach outside the checkpoint or the temporary copy's directory.
        source = f"{path}/{HF_INDEX_JSON}"
        names = sorted({common.safe_member_name(n, source) for n in weight_map.values()})
        for name in names:
            if not fs.exists(common.join(root, name)):
                raise common.CheckpointError(
                    f"{path}/{HF_INDEX_JSON} lists {name}, which does not exist"
                )
        return names
    names = sorted(
        os.path.basename(p) for p in fs.ls(root, detail=False) if p.endswith(".safetensors")
    )
    if not names:
        raise common.CheckpointError(f"{path}: no *.safetensors files")
    return names


# ----------------------------------------------------------------------------------------------
# safetensors files through the safetensors library.


@contextlib.contextmanager
def _local_copies(
    fs: fsspec.AbstractFileSystem, root: str, names: list[str]
) -> Iterator[dict[str, str]]:
    """Local paths of ``root/name`` for each name: the files themselves, or temporary copies.

    safetensors reads only local files (it memory-maps them), so files on any
    other filesystem are fetched into a temporary directory that is removed on exit.
    """
    if common.is_local(fs):
        yield {name: os.path.abspath(common.join(root, name)) for name in names}
        return
    with tempfile.TemporaryDirectory(prefix="griffin-hf-") as tmp:
        local = {name: os.path.join(tmp, name) for name in names}
        for name, local_path in local.items():
            os.makedirs(os.path.dirname(local_path), exist_ok=True)
            fs.get(common.join(root, name), local_path)
        yield local


class _Shard:
    """One local .safetensors file: tensor shapes from its header, then all tensors on demand.

    Attributes:
      local_path: Where the file is on this machine (possibly a temporary copy).
      source: The file's path as the caller named it, for messages.
      shapes: Tensor name -> shape, from the header (no tensor data is read).
    """

    def __init__(self, local_path: str, source: str):
        self.local_path, self.source = local_path, source
        with self._open() as f:
            self.shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not iterable)

    def _open(self):
        try:
            # framework="flax": jax always has bfloat16; safetensors.numpy's dtype table has no BF16.
            return safetensors.safe_open(self.local_path, framework="flax")
        except (safetensors.SafetensorError, OSError) as e:
            raise common.CheckpointError(f"{self.source}: not a safetensors file ({e})") from None

    def read_all(self) -> dict[str, np.ndarray]:
        """Every tensor of the file as a NumPy array, bfloat16 kept (as ml_dtypes.bfloat16)."""
        import jax

        out = {}
        # get_tensor makes jax arrays; keep them on the host rather than on an accelerator.
        with jax.default_device(jax.devices("cpu")[0]), self._open() as f:
            for name in self.shapes:
                try:
                    out[name] = np.asarray(f.get_tensor(name))
                except (safetensors.SafetensorError, ValueError, TypeError) as e:
                    raise common.CheckpointError(
                        f"{self.source}: cannot read tensor {name} with shape "
                        f"{self.shapes[name]} ({e})"
                    ) from None
        return out


def write_safetensors(fs: fsspec.AbstractFileSystem, path: str, tensors: Mapping[str, Any]) -> None:
    """Writes ``tensors`` as one safetensors file (with transformers' "pt" metadata).

    Args:
      fs: The target filesystem.
      path: The file's path on ``fs``. Remote files are written in one upload.
      tensors: Name -> NumPy or jax array (bfloat16 included).

    Raises:
      CheckpointError: A dtype safetensors cannot store, or the write failed.
    """
    # Imported here, not at the top: safetensors.flax imports jax, and importing this package
    # stays cheap.
    import safetensors.flax

    # The library writes each array's buffer as is, so strided views must be copied first.
    arrays = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    try:
        if common.is_local(fs):
            safetensors.flax.save_file(arrays, os.path.abspath(path), metadata=_METADATA)
            return
        data = safetensors.flax.save(arrays, metadata=_METADATA)
    except (safetensors.SafetensorError, ValueError, TypeError) as e:
        dtypes = sorted({a.dtype.name for a in arrays.values()})
        raise common.CheckpointError(
            f"{path}: cannot write tensors of dtypes {dtypes} as safetensors ({e})"
        ) from None
    with fs.open(path, "wb") as f:
        f.write(data)
