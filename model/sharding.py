"""How parameters and slot state are laid out over a host's devices.

The mesh has two axes: ``data`` splits the engine's slots (batch), ``model``
splits the parameters (tensor parallelism, for models that do not fit one
chip). With ``model`` of size 1 the parameters are simply replicated.

Parameter rules follow Griffin's structure: the wide dimension of each
projection (MLP hidden, RG-LRU width, attention heads) is split, so every chip
holds 1/model of the weights and XLA inserts the reductions. A dimension that
does not divide evenly stays replicated rather than failing.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"

# (parameter path suffix, axis to split over MODEL). Paths are "/"-joined keys.
_RULES: tuple[tuple[str, int], ...] = (
    ("mlp_block/ffw_up/w", 2),
    ("mlp_block/ffw_up/b", 3),
    ("mlp_block/ffw_down/kernel", 0),
    ("recurrent_block/linear_x/kernel", 1),
    ("recurrent_block/linear_x/bias", 0),
    ("recurrent_block/linear_y/kernel", 1),
    ("recurrent_block/linear_y/bias", 0),
    ("recurrent_block/linear_out/kernel", 0),
    ("recurrent_block/conv_1d/w", 1),
    ("recurrent_block/conv_1d/b", 0),
    ("rg_lru/a_param", 0),
    ("rg_lru/input_gate/w", 0),
    ("rg_lru/input_gate/b", 0),
    ("rg_lru/a_gate/w", 0),
    ("rg_lru/a_gate/b", 0),
    ("attention_block/proj_q/kernel", 1),
    ("attention_block/proj_final/kernel", 0),
    ("embedder/input_embedding", 0),
)


def make_mesh(num_devices: int | None = None, model_parallel: int = 1) -> Mesh:
    """A (data, model) mesh over the first ``num_devices`` local devices."""
    devices = jax.local_devices()[: num_devices or None]
    if model_parallel <= 0 or len(devices) % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} must divide the {len(devices)} "
                         "local devices in use")
    grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, (DATA, MODEL))


def param_spec(path: str, shape: tuple[int, ...], model_size: int) -> P:
    """The PartitionSpec of one parameter given its "/"-joined path."""
    if model_size > 1:
        for suffix, axis in _RULES:
            if path.endswith(suffix) and shape[axis] % model_size == 0:
                spec = [None] * len(shape)
                spec[axis] = MODEL
                return P(*spec)
    return P()


def param_shardings(params, mesh: Mesh):
    """A pytree of NamedShardings matching ``params``."""
    model_size = mesh.shape[MODEL]

    def one(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return NamedSharding(mesh, param_spec(name, leaf.shape, model_size))

    return jax.tree_util.tree_map_with_path(one, params)


def slot_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (slot) axis split over ``data``; the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
