"""orbax checkpoints: the format DeepMind's reference ``recurrentgemma`` writes.

A directory written by ``recurrentgemma.jax.utils.save_parameters`` (or any
``PyTreeCheckpointer`` save of the reference tree, with or without a top-level
"params" key). Shape fields of the config come from the parameters; the other
hyper-parameters from a ``config.json`` beside it (``GriffinConfig`` field
names) or from a preset.

orbax (through tensorstore) reads local paths and gs:// itself; any other
fsspec filesystem is copied to a local temporary directory first, once every
name in its listing is known to stay inside the copy.

This file is not called ``orbax.py`` so that, inside this package, the name
``orbax`` always means the library.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np

from griffin_batch.model.checkpoint import common
from griffin_batch.model.config import GriffinConfig, Preset

# Files any orbax PyTree checkpoint (old msgpack or current OCDBT layout) has at its root.
MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "checkpoint", "manifest.ocdbt")


def matches(names: list[str]) -> bool:
    """Whether a directory holding the files ``names`` (base names) is an orbax checkpoint."""
    return any(n in names for n in MARKERS)


def load(
    fs: fsspec.AbstractFileSystem, root: str, path: str, preset: Preset | None
) -> tuple[GriffinConfig, dict[str, np.ndarray]]:
    """Reads an orbax checkpoint directory into flat reference parameters on the host.

    Args:
      fs: The filesystem holding the checkpoint.
      root: The checkpoint directory on ``fs``.
      path: The checkpoint path as the caller gave it, for messages.
      preset: Optional preset supplying or checking hyper-parameters.

    Returns:
      ``(config, flat)`` with ``flat`` NumPy arrays keyed by "/"-joined reference path.

    Raises:
      CheckpointError: A ``config.json`` with unknown fields, hyper-parameters
        that no source gives, parameters that contradict the config, or an
        entry (a name in a remote listing, a local symbolic link) that reaches
        outside the checkpoint.
    """
    declared = None
    config_path = common.join(root, common.CONFIG_JSON)
    if fs.exists(config_path):
        declared = common.read_json(fs, config_path)
        fields = {f.name for f in dataclasses.fields(GriffinConfig)}
        unknown = sorted(set(declared) - fields)
        if unknown:
            raise common.CheckpointError(
                f"{path}/{common.CONFIG_JSON}: unknown fields {unknown}; expected GriffinConfig "
                f"fields {sorted(fields)}"
            )
    if common.is_local(fs):
        # Read in place, so nothing is copied; but orbax would follow a link out of the
        # directory, so such links are refused (os.path.realpath) before it reads anything.
        _check_local_links(os.path.abspath(root), path)
        tree = _restore(os.path.abspath(root))
    elif _orbax_native(fs):
        tree = _restore(path)
    else:
        with tempfile.TemporaryDirectory(prefix="griffin-ckpt-") as tmp:
            local = os.path.join(tmp, "ckpt")
            _copy_to_local(fs, root, local, path)
            tree = _restore(local)
    if isinstance(tree.get("params"), Mapping):
        tree = tree["params"]
    inferred = common.infer_shape_fields(tree, source=path)
    config = common.resolve_config(inferred, declared, preset, source=path)
    return config, {k: np.asarray(v) for k, v in common.flatten(tree)}


def save(
    fs: fsspec.AbstractFileSystem, root: str, config: GriffinConfig, flat: Mapping[str, np.ndarray]
) -> None:
    """Writes the tree ``{"params": params}`` with orbax, and our ``config.json`` beside it.

    Args:
      fs: The target filesystem.
      root: The checkpoint directory on ``fs``; must not exist yet (orbax refuses).
      config: The model config, written with ``GriffinConfig`` field names.
      flat: Reference parameters keyed by "/"-joined path, already checked against ``config``.
    """
    # Imported here, not at the top: orbax imports jax, and importing this package stays cheap.
    import orbax.checkpoint as ocp

    tree = {"params": common.unflatten(flat)}
    if common.is_local(fs):
        ocp.PyTreeCheckpointer().save(os.path.abspath(root), tree)
    else:
        with tempfile.TemporaryDirectory(prefix="griffin-ckpt-") as tmp:
            local = os.path.join(tmp, "ckpt")
            ocp.PyTreeCheckpointer().save(local, tree)
            fs.put(local, root, recursive=True)
    common.write_json(fs, common.join(root, common.CONFIG_JSON), config.to_dict())


def _orbax_native(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether orbax reads this filesystem itself; otherwise the directory is copied locally."""
    if common.is_local(fs):
        return True
    if common.protocols(fs) & {"gs", "gcs"}:
        # tensorstore reads gs:// itself but ignores gcsfs's emulator variable; copy then.
        return not (
            os.environ.get("STORAGE_EMULATOR_HOST")
            and not os.environ.get("TENSORSTORE_GCS_HTTP_URL")
        )
    return False


def _copy_to_local(fs: fsspec.AbstractFileSystem, root: str, local: str, path: str) -> None:
    """Copies the directory ``root`` on ``fs`` to the new local directory ``local``.

    The listing is untrusted (an object store holds any key, "a/../../b"
    included), so every entry is checked before the first byte is copied, and
    each copy's local path is built from the checked name rather than left to
    fsspec.

    Raises:
      CheckpointError: An entry outside ``root`` or whose name could reach
        outside ``local`` (see ``common.safe_member_name``), naming it.
    """
    top = root.rstrip("/")
    prefix = top + "/"
    listing = fs.find(root, withdirs=True, detail=True)
    # Files first, so that a crafted key is named rather than the pseudo-directories above it.
    entries = sorted(
        (info.get("type") == "directory", entry)
        for entry, info in listing.items()
        if entry.rstrip("/") != top
    )
    dirs, files = [], []
    for is_dir, entry in entries:
        if not entry.startswith(prefix):
            raise common.CheckpointError(
                f"{path}: the listing holds {entry!r}, which is outside {root!r}"
            )
        name = common.safe_member_name(entry[len(prefix) :].rstrip("/"), path)
        target = os.path.join(local, *name.split("/"))
        (dirs if is_dir else files).append((entry, target))
    os.makedirs(local)
    for _, target in dirs:
        os.makedirs(target, exist_ok=True)
    for _, target in files:
        os.makedirs(os.path.dirname(target), exist_ok=True)
    if files:  # lists on both sides: fsspec copies each to the path given, in parallel if it can
        fs.get([entry for entry, _ in files], [target for _, target in files])


def _check_local_links(root: str, path: str) -> None:
    """Refuses a local checkpoint with a symbolic link that resolves outside it.

    orbax would follow such a link and read whatever file it names as checkpoint
    data; a link to a place inside the checkpoint (or ``root`` itself being a
    link) is fine.

    Raises:
      CheckpointError: Naming the link and where it points.
    """
    real_root = os.path.realpath(root)
    for parent, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            entry = os.path.join(parent, name)
            if not os.path.islink(entry):
                continue
            target = os.path.realpath(entry)
            if os.path.commonpath([real_root, target]) != real_root:
                raise common.CheckpointError(
                    f"{path}: entry {os.path.relpath(entry, root)!r} is a link to {target!r}, "
                    f"outside the checkpoint"
                )


def _restore(location: str) -> dict[str, Any]:
    """Restores any PyTree checkpoint as NumPy arrays on the host (no device placement)."""
    # Imported here, not at the top: both import jax, and importing this package stays cheap.
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
