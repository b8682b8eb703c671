"""What every checkpoint format shares: the parameter tree, config inference, errors, file helpers.

The format modules (``orbax_format``, ``hf_format``) build on this module and on
nothing of each other, so neither format can pull the other into an import
circle. Everything here is format-neutral:

* the reference Flax parameter tree (``param_shapes``, ``check_params``) and the
  "/"-joined flat form the formats exchange (``flatten``, ``unflatten``);
* config assembly: fields the shapes determine (``infer_shape_fields``) merged
  with a declared config and a preset (``resolve_config``);
* ``CheckpointError`` and ``describe_config``, so that every message names the
  config in the same words;
* small fsspec helpers (``join``, ``read_json``, ``write_json``, ``is_local``) and
  ``safe_member_name``, which keeps a file name read from a checkpoint inside it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec

from griffin_batch.model.config import ATTENTION, RECURRENT, GriffinConfig, Preset

CONFIG_JSON = "config.json"
# Hyper-parameters that parameter shapes cannot tell.
HYPER_FIELDS = ("embeddings_scale_by_sqrt_dim", "attention_window_size", "logits_soft_cap")
# A Windows drive ("C:", "C:x"): os.path.join on Windows would drop the directory before it.
_DRIVE = re.compile(r"^[A-Za-z]:")

Params = dict[str, Any]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config."""


# ----------------------------------------------------------------------------------------------
# The reference parameter tree.


def param_shapes(config: GriffinConfig) -> dict[str, Any]:
    """Shapes of the reference Flax parameter tree for ``config``.

    Args:
      config: The model config.

    Returns:
      A nested dict (``embedder``, ``blocks.{i}``, ``final_norm``) of shape tuples,
      keyed exactly as DeepMind's reference model names its parameters.
    """
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
    """Checks ``params`` against the reference tree of ``config``, parameter by parameter.

    Args:
      config: The model config.
      params: Nested parameter tree (anything with ``.shape`` at the leaves).
      source: What the parameters came from (a path), for messages.

    Raises:
      CheckpointError: Naming the first missing, unexpected or mis-shaped parameter.
    """
    expected = dict(flatten(param_shapes(config)))
    got = dict(flatten(params))
    for key, shape in expected.items():
        if key not in got:
            raise CheckpointError(
                f"{source}: missing parameter {key} (expected shape {shape} for "
                f"{describe_config(config)})"
            )
        if tuple(got[key].shape) != shape:
            raise CheckpointError(
                f"{source}: parameter {key} has shape {tuple(got[key].shape)}, expected {shape} "
                f"for {describe_config(config)}"
            )
    for key in got:
        if key not in expected:
            raise CheckpointError(
                f"{source}: unexpected parameter {key} with shape {tuple(got[key].shape)}; "
                f"{describe_config(config)} has no such parameter"
            )


def describe_config(config: GriffinConfig) -> str:
    """The shape-determining fields of ``config`` in one line, for error messages."""
    return (
        f"config(vocab_size={config.vocab_size}, width={config.width}, "
        f"mlp_expanded_width={config.mlp_expanded_width}, num_heads={config.num_heads}, "
        f"lru_width={config.effective_lru_width}, block_types={list(config.block_types)})"
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields ``("a/b/c", leaf)`` for every leaf of a nested mapping, depth first.

    Args:
      tree: Nested mapping; anything that is not a ``Mapping`` is a leaf.
      prefix: Prepended to every key (used by the recursion).
    """
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def unflatten(flat: Mapping[str, Any]) -> Params:
    """The nested dict of ``flat``'s "/"-joined keys; the inverse of ``flatten``."""
    tree: Params = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


# ----------------------------------------------------------------------------------------------
# Config: shape fields from the parameters, hyper-parameters from config.json or a preset.


def infer_shape_fields(params: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The config fields that the reference parameter tree's shapes determine.

    Args:
      params: Nested reference parameter tree (leaves need only ``.shape``).
      source: What the parameters came from (a path), for messages.

    Returns:
      ``vocab_size``, ``width``, ``mlp_expanded_width``, ``num_heads``,
      ``block_types`` and, with a recurrent block, ``lru_width`` and ``conv1d_width``.

    Raises:
      CheckpointError: A parameter the inference needs is missing, a block is
        of neither kind, or blocks disagree on the head count.
    """

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

    Returns:
      The complete config.

    Raises:
      CheckpointError: A declared or preset value contradicts another source, or
        a hyper-parameter (``HYPER_FIELDS``) is given by none of them.
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
    missing = [f for f in HYPER_FIELDS if f not in fields]
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
# Small fsspec helpers.


def protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    """Every protocol name ``fs`` answers to (fsspec gives one string or a tuple)."""
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk, which libraries that take only paths can read directly."""
    return bool(protocols(fs) & {"file", "local"})


def join(root: str, name: str) -> str:
    """``root/name`` with exactly one slash; fsspec paths always use "/", so not ``os.path``."""
    return f"{root.rstrip('/')}/{name}"


def safe_member_name(name: Any, source: str) -> str:
    """Checks that a file name read from a checkpoint stays inside the checkpoint.

    Names come from untrusted data (a shard index's ``weight_map``, a directory
    listing) and are joined to the checkpoint directory and to a local
    temporary directory; a name that could point elsewhere is refused, so that
    a crafted checkpoint can neither read nor write outside its place.

    Args:
      name: The entry: a "/"-separated path relative to the checkpoint directory.
      source: The checkpoint file or directory the entry came from, for messages.

    Returns:
      ``name`` unchanged.

    Raises:
      CheckpointError: ``name`` is not a string, is empty, is absolute (POSIX
        "/x", a Windows drive "C:" or UNC "\\\\host"), has a ".." component, or
        contains a backslash or NUL; the message names ``source`` and the entry.
    """
    if not isinstance(name, str):
        reason = f"is a {type(name).__name__}, not a file name"
    elif not name:
        reason = "is empty"
    elif "\0" in name:
        reason = "contains NUL"
    elif "\\" in name:  # also every UNC path; a "/"-separated name never needs one
        reason = "contains a backslash"
    elif name.startswith("/") or _DRIVE.match(name):
        reason = "is absolute"
    elif ".." in name.split("/"):
        reason = "has a '..' component"
    else:
        return name
    raise CheckpointError(
        f"{source}: entry {name!r} {reason}; only paths inside the checkpoint are allowed"
    )


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """Reads the JSON file at ``path`` on ``fs``.

    Raises:
      CheckpointError: The file is not valid JSON (naming the file).
    """
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def write_json(fs: fsspec.AbstractFileSystem, path: str, value: Mapping[str, Any]) -> None:
    """Writes ``value`` as indented, key-sorted JSON (stable bytes for the same value)."""
    with fs.open(path, "wb") as f:
        f.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
