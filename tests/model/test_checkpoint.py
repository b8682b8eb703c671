"""Checkpoint loading: orbax (as the reference writes it) and Hugging Face safetensors.

Numerics are checked against the two oracles: DeepMind's reference Flax model
and transformers' RecurrentGemmaForCausalLM, both on tiny random models.
"""

from __future__ import annotations

import functools
import json
import os
import re

import fsspec
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
import safetensors.numpy

from griffin_batch.model import checkpoint, testing
from griffin_batch.model.checkpoint import common, hf_format
from griffin_batch.model.config import GriffinConfig, Preset

# float32 logits of two implementations of the same model agree to this (max abs).
LOGITS_ATOL = 1e-4
SEQ_LEN = 12  # <= every attention window below: transformers' window is one shorter past it
BATCH = 2

CONFIGS = {
    "griffin": testing.tiny_config(),
    # width != lru_width, 3 heads, irregular block order, no embedding scale, no soft-cap.
    "irregular": testing.tiny_config(
        width=48,
        num_heads=3,
        lru_width=96,
        mlp_expanded_width=80,
        block_types=("attention", "recurrent", "recurrent", "attention"),
        embeddings_scale_by_sqrt_dim=False,
        logits_soft_cap=0.0,
    ),
    "hawk": testing.tiny_config(
        width=32, num_heads=2, lru_width=48, block_types=("recurrent",) * 2
    ),
    "attention_only": testing.tiny_config(width=32, num_heads=2, block_types=("attention",)),
}


def _tokens(vocab_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (BATCH, SEQ_LEN)).astype(np.int32)


@functools.cache
def _reference_apply(config: GriffinConfig):
    """Jitted reference forward pass: (params, tokens) -> float32 logits."""
    from recurrentgemma import jax as rg

    model = rg.Griffin(testing.reference_config(config), gradient_checkpointing=False)

    @jax.jit
    def apply(params, tokens):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model.apply({"params": params}, tokens, pos)[0].astype(jnp.float32)

    return apply


def _assert_trees_equal(a, b):
    fa, fb = dict(testing.iter_leaves(a)), dict(testing.iter_leaves(b))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x, y, err_msg=k)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _hyper_json(config: GriffinConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k in common.HYPER_FIELDS}


# ---------------------------------------------------------------------------------------------
# The parameter tree itself.


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_shapes_match_reference_init(name):
    from recurrentgemma import jax as rg

    config = CONFIGS[name]
    model = rg.Griffin(testing.reference_config(config))
    tokens = jnp.zeros((1, 4), jnp.int32)
    ref = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, jnp.arange(4)[None])["params"]
    ref_shapes = {k: tuple(v.shape) for k, v in testing.iter_leaves(jax.tree.map(lambda x: x, ref))}
    assert ref_shapes == dict(testing.iter_leaves(checkpoint.param_shapes(config)))
    inferred = checkpoint.infer_shape_fields(testing.random_params(config), source="x")
    assert GriffinConfig(**{**config.to_dict(), **inferred}) == config


@pytest.mark.parametrize("module", ["common", "orbax_format", "hf_format"])
def test_format_modules_build_only_on_common(module):
    # The layering that keeps the package free of import circles: a format module imports
    # common and nothing else of the package; common imports nothing of it.
    import ast

    path = os.path.join(os.path.dirname(checkpoint.__file__), f"{module}.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {
        f"{n.module}.{a.name}"
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module
        for a in n.names
    }
    package = "griffin_batch.model.checkpoint"
    inside = {n for n in names if n.startswith(f"{package}.")}
    assert inside == (set() if module == "common" else {f"{package}.common"})


# ---------------------------------------------------------------------------------------------
# orbax.


@pytest.fixture(scope="session")
def reference_orbax(tmp_path_factory):
    """Checkpoints written by the reference's own save_parameters from its own (perturbed) init."""
    from recurrentgemma import jax as rg
    from recurrentgemma.jax import utils as rg_utils

    out = {}
    for name in ("griffin", "irregular"):
        config = CONFIGS[name]
        model = rg.Griffin(testing.reference_config(config))
        tokens = jnp.zeros((1, 4), jnp.int32)
        params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens, jnp.arange(4)[None])["params"]
        params = testing.perturb(jax.tree.map(np.asarray, params), seed=2)
        path = str(tmp_path_factory.mktemp("ref") / name)
        rg_utils.save_parameters(path, params)
        out[name] = (path, config, params)
    return out


def _load_with_hypers(path, config):
    """Loads a reference-written checkpoint with a config.json of the hyper-parameters beside it."""
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_hyper_json(config), f)
    try:
        return checkpoint.load_checkpoint(path)
    finally:
        os.remove(os.path.join(path, "config.json"))


@pytest.mark.parametrize("name", ["griffin", "irregular"])
def test_reference_saved_checkpoint_loads_with_config_json(reference_orbax, name):
    path, config, params = reference_orbax[name]
    loaded_config, loaded = _load_with_hypers(path, config)
    assert loaded_config == config
    _assert_trees_equal(loaded, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
    tokens = _tokens(config.vocab_size)
    np.testing.assert_array_equal(
        np.asarray(_reference_apply(config)(loaded, tokens)),
        np.asarray(_reference_apply(config)(params, tokens)),
    )


@pytest.mark.parametrize("name", ["griffin", "irregular"])
def test_forward_logits_on_loaded_checkpoint_matches_reference(reference_orbax, name):
    import griffin_batch.model as model_pkg

    path, config, params = reference_orbax[name]
    loaded_config, loaded = _load_with_hypers(path, config)
    tokens = _tokens(config.vocab_size)
    expected = _reference_apply(config)(params, tokens)
    ours = model_pkg.forward_logits(loaded_config, loaded, tokens)
    diff = _max_diff(ours, expected)
    print(f"{name}: model.forward_logits vs reference Flax, max abs diff {diff:.3g}")
    assert diff <= LOGITS_ATOL


def test_hyper_parameters_from_preset_or_missing(reference_orbax):
    path, config, _ = reference_orbax["griffin"]
    with pytest.raises(checkpoint.CheckpointError, match=r"preset=.*config\.json"):
        checkpoint.load_checkpoint(path)
    # Tiny shapes never match a real preset; the error names the field and both values.
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"recurrentgemma-2b.*width is 64 in the checkpoint but 2560",
    ):
        checkpoint.load_checkpoint(path, preset="recurrentgemma-2b")


def test_preset_supplies_hyper_parameters(tmp_path, monkeypatch):
    # Real presets are too big to build here, so shrink Hawk-7B's shapes in the preset table:
    # the hyper-parameters (window, soft-cap, embedding scale) then come from the preset.
    from griffin_batch.model import config as config_module

    small = Preset.HAWK_7B.config(vocab_size=32).replace(
        width=32, mlp_expanded_width=96, num_heads=2, lru_width=64, block_types=("recurrent",) * 2
    )
    monkeypatch.setitem(
        config_module._PRESETS,
        Preset.HAWK_7B,
        {k: getattr(small, k) for k in config_module._PRESETS[Preset.HAWK_7B]},
    )
    path = str(tmp_path / "ckpt")
    ocp.PyTreeCheckpointer().save(path, testing.random_params(small))  # no "params" level
    loaded_config, _ = checkpoint.load_checkpoint(path, preset="hawk-7b")
    assert loaded_config == small
    assert loaded_config.attention_window_size == 1024 and loaded_config.logits_soft_cap == 0.0


def test_orbax_round_trip_and_dtype(tmp_path):
    config = CONFIGS["hawk"]
    params = testing.random_params(config, seed=3)
    path = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(path, config, params)
    assert checkpoint.detect_format(path) == checkpoint.ORBAX
    loaded_config, loaded = checkpoint.load_checkpoint(path)
    assert loaded_config == config
    _assert_trees_equal(loaded, params)
    _, bf16 = checkpoint.load_checkpoint(path, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    _, f32 = checkpoint.load_checkpoint(path, dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(f32)} == {jnp.dtype(jnp.float32)}
    with pytest.raises(FileExistsError):
        checkpoint.save_checkpoint(path, config, params)
    # An unknown format is refused before overwrite=True removes anything.
    with pytest.raises(ValueError, match=r"unknown checkpoint format 'zip'; expected 'orbax' or"):
        checkpoint.save_checkpoint(path, config, params, format="zip", overwrite=True)
    assert checkpoint.detect_format(path) == checkpoint.ORBAX


def test_attention_only_model_round_trips(tmp_path):
    config = CONFIGS["attention_only"]
    params = testing.random_params(config, seed=4)
    checkpoint.save_checkpoint(str(tmp_path / "o"), config, params)
    loaded_config, loaded = checkpoint.load_checkpoint(str(tmp_path / "o"))
    assert loaded_config == config  # num_heads from width // proj_k width
    _assert_trees_equal(loaded, params)


# ---------------------------------------------------------------------------------------------
# Hugging Face.

HF_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=2 * 96,
    num_attention_heads=4,
    num_key_value_heads=1,
    lru_width=96,
    num_hidden_layers=4,
    block_types=["attention", "recurrent", "recurrent"],
    attention_window_size=16,
    logits_soft_cap=30.0,
)


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """A random transformers RecurrentGemmaForCausalLM (every weight perturbed), saved twice."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.RecurrentGemmaConfig(**HF_CONFIG, attn_implementation="eager")
    model = transformers.RecurrentGemmaForCausalLM(hf_config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tokens = _tokens(HF_CONFIG["vocab_size"], seed=5)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens).long(), use_cache=False).logits.numpy()
    root = tmp_path_factory.mktemp("hf")
    single, sharded = str(root / "single"), str(root / "sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")
    return {"single": single, "sharded": sharded, "tokens": tokens, "logits": logits}


def test_hf_load_matches_transformers(hf_model):
    config, params = checkpoint.load_checkpoint(hf_model["single"])
    assert config == GriffinConfig(
        vocab_size=256,
        width=64,
        mlp_expanded_width=96,
        num_heads=4,
        lru_width=96,
        block_types=("attention", "recurrent", "recurrent", "attention"),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=16,
        logits_soft_cap=30.0,
    )
    ours = _reference_apply(config)(params, hf_model["tokens"])
    diff = _max_diff(ours, hf_model["logits"])
    print(f"reference Flax on converted params vs transformers: max abs diff {diff:.3g}")
    assert diff <= LOGITS_ATOL


def test_our_model_matches_transformers_within_window_and_past_it(hf_model):
    """Our forward against transformers: exact within the window; past it, transformers
    with window w equals the reference (and us) with window w - 1."""
    import torch
    import transformers

    import griffin_batch.model as model_pkg

    config, params = checkpoint.load_checkpoint(hf_model["single"])
    ours = model_pkg.forward_logits(config, params, hf_model["tokens"])
    diff = _max_diff(ours, hf_model["logits"])
    print(f"model.forward_logits vs transformers within the window: max abs diff {diff:.3g}")
    assert diff <= LOGITS_ATOL

    hf = transformers.RecurrentGemmaForCausalLM.from_pretrained(
        hf_model["single"], dtype=torch.float32, attn_implementation="eager").eval()
    long = np.random.default_rng(11).integers(0, config.vocab_size, (2, 3 * 16 + 5))
    with torch.no_grad():
        hf_long = hf(torch.from_numpy(long).long(), use_cache=False).logits.numpy()
    shifted = config.replace(attention_window_size=config.attention_window_size - 1)
    diff_shifted = _max_diff(model_pkg.forward_logits(shifted, params, long), hf_long)
    diff_same = _max_diff(model_pkg.forward_logits(config, params, long), hf_long)
    print(f"past the window: ours(w-1) vs transformers(w) {diff_shifted:.3g}, "
          f"ours(w) vs transformers(w) {diff_same:.3g}")
    assert diff_shifted <= LOGITS_ATOL
    assert diff_same > LOGITS_ATOL  # the known one-key difference is real, not noise


def test_hf_sharded_checkpoint(hf_model):
    names = os.listdir(hf_model["sharded"])
    assert checkpoint.HF_INDEX_JSON in names
    assert sum(n.endswith(".safetensors") for n in names) > 1
    config, params = checkpoint.load_checkpoint(hf_model["sharded"])
    single_config, single = checkpoint.load_checkpoint(hf_model["single"])
    assert config == single_config
    _assert_trees_equal(params, single)


def test_our_hf_writer_loads_in_transformers(tmp_path):
    import torch
    import transformers

    config = CONFIGS["griffin"]
    params = testing.random_params(config, seed=6)
    path = str(tmp_path / "hf")
    checkpoint.save_checkpoint(path, config, params, format="hf")
    assert checkpoint.detect_format(path) == checkpoint.HF
    loaded_config, loaded = checkpoint.load_checkpoint(path)
    assert loaded_config == config
    _assert_trees_equal(loaded, params)

    model = transformers.RecurrentGemmaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = _tokens(config.vocab_size, seed=7)
    with torch.no_grad():
        hf_logits = model(torch.from_numpy(tokens).long(), use_cache=False).logits.numpy()
    diff = _max_diff(_reference_apply(config)(params, tokens), hf_logits)
    print(f"our hf writer: transformers vs reference Flax, max abs diff {diff:.3g}")
    assert diff <= LOGITS_ATOL


def test_hf_bfloat16_and_untied_head(tmp_path):
    config = CONFIGS["griffin"]
    params = testing.random_params(config, seed=8, dtype=ml_dtypes.bfloat16)
    path = str(tmp_path / "hf")
    checkpoint.save_checkpoint(path, config, params, format="hf")
    _, loaded = checkpoint.load_checkpoint(path)
    _assert_trees_equal(loaded, params)
    # A tied lm_head stored explicitly is fine; a different one is refused.
    flat = hf_format.params_to_hf(config, dict(testing.iter_leaves(params)))
    flat["lm_head.weight"] = flat["model.embed_tokens.weight"]
    fs = fsspec.filesystem("file")
    hf_format.write_safetensors(fs, f"{path}/model.safetensors", flat)
    checkpoint.load_checkpoint(path)
    flat["lm_head.weight"] = flat["lm_head.weight"] + np.ones((), ml_dtypes.bfloat16)
    hf_format.write_safetensors(fs, f"{path}/model.safetensors", flat)
    with pytest.raises(checkpoint.CheckpointError, match="lm_head.weight differs"):
        checkpoint.load_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# fsspec.


def test_load_from_memory_filesystem(hf_model, tmp_path):
    config = CONFIGS["irregular"]
    params = testing.random_params(config, seed=9)
    local = str(tmp_path / "orbax")
    checkpoint.save_checkpoint(local, config, params)
    fs = fsspec.filesystem("memory")
    fs.put(local, "/ckpts/orbax", recursive=True)
    fs.put(hf_model["sharded"], "/ckpts/hf", recursive=True)
    try:
        loaded_config, loaded = checkpoint.load_checkpoint("memory://ckpts/orbax")
        assert loaded_config == config
        _assert_trees_equal(loaded, params)
        hf_config, hf = checkpoint.load_checkpoint("memory://ckpts/hf")
        single_config, single = checkpoint.load_checkpoint(hf_model["single"])
        assert hf_config == single_config
        _assert_trees_equal(hf, single)
        # And writing to fsspec URLs.
        checkpoint.save_checkpoint("memory://ckpts/written", config, params, format="orbax")
        _assert_trees_equal(checkpoint.load_checkpoint("memory://ckpts/written")[1], params)
        cfg = CONFIGS["griffin"]
        p = testing.random_params(cfg)
        checkpoint.save_checkpoint("memory://ckpts/written_hf", cfg, p, format="hf")
        _assert_trees_equal(checkpoint.load_checkpoint("memory://ckpts/written_hf")[1], p)
    finally:
        fs.rm("/ckpts", recursive=True)


def test_remote_hf_bfloat16_round_trip_cleans_up(tmp_path, monkeypatch):
    # Remote safetensors files are read from a local copy; it must not outlive the load.
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    config = CONFIGS["hawk"]
    params = testing.random_params(config, seed=10, dtype=ml_dtypes.bfloat16)
    fs = fsspec.filesystem("memory")
    try:
        checkpoint.save_checkpoint("memory://bf16/hf", config, params, format="hf")
        assert fs.exists("/bf16/hf/model.safetensors") and not os.listdir(scratch)
        loaded_config, loaded = checkpoint.load_checkpoint("memory://bf16/hf")
        assert loaded_config == config
        _assert_trees_equal(loaded, params)
        assert not os.listdir(scratch)
    finally:
        fs.rm("/bf16", recursive=True)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_missing_and_unknown_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.load_checkpoint(str(tmp_path / "nowhere"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "weights.bin").write_bytes(os.urandom(64))
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"unknown format; found \['notes.txt', 'weights.bin'\].*orbax.*safetensors",
    ):
        checkpoint.load_checkpoint(str(junk))
    (junk / "notes.txt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="is a file"):
        checkpoint.load_checkpoint(str(junk / "weights.bin"))


def _save_orbax_flat(path, config, flat, hypers=True):
    ocp.PyTreeCheckpointer().save(path, {"params": common.unflatten(flat)})
    if hypers:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(_hyper_json(config), f)


def test_orbax_shape_and_key_errors(tmp_path):
    config = CONFIGS["griffin"]
    good = dict(testing.iter_leaves(testing.random_params(config)))

    bad = dict(good)
    bad["blocks.1/recurrent_block/linear_out/kernel"] = np.zeros((64, 63), np.float32)
    _save_orbax_flat(str(tmp_path / "shape"), config, bad)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"blocks\.1/recurrent_block/linear_out/kernel has shape \(64, 63\), "
        r"expected \(64, 64\)",
    ):
        checkpoint.load_checkpoint(str(tmp_path / "shape"))

    missing = dict(good)
    del missing["blocks.2/attention_block/proj_v/kernel"]
    _save_orbax_flat(str(tmp_path / "missing"), config, missing)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"missing parameter blocks\.2/attention_block/proj_v/kernel "
        r"\(expected shape \(64, 16\)",
    ):
        checkpoint.load_checkpoint(str(tmp_path / "missing"))

    extra = dict(good)
    extra["blocks.0/recurrent_block/extra"] = np.zeros((3,), np.float32)
    _save_orbax_flat(str(tmp_path / "extra"), config, extra)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"extra.*unexpected parameter blocks\.0/recurrent_block/extra",
    ):
        checkpoint.load_checkpoint(str(tmp_path / "extra"))

    _save_orbax_flat(str(tmp_path / "disagree"), config, good, hypers=False)
    with open(tmp_path / "disagree" / "config.json", "w") as f:
        json.dump({**_hyper_json(config), "num_heads": 8}, f)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"num_heads is 8 in .*config\.json but the parameters have 4",
    ):
        checkpoint.load_checkpoint(str(tmp_path / "disagree"))


def test_hf_shape_and_config_errors(hf_model, tmp_path):
    config = CONFIGS["griffin"]
    flat = hf_format.params_to_hf(
        config, dict(testing.iter_leaves(testing.random_params(config)))
    )
    fs = fsspec.filesystem("file")

    def write(name, tensors, hf_config=None):
        path = tmp_path / name
        path.mkdir()
        hf_format.write_safetensors(fs, str(path / "model.safetensors"), tensors)
        if hf_config is not False:
            with open(path / "config.json", "w") as f:
                json.dump(hf_config or hf_format.hf_config_dict(config), f)
        return str(path)

    bad = dict(flat)
    bad["model.layers.1.temporal_block.linear_out.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"model\.safetensors: tensor model\.layers\.1\.temporal_block\.linear_out"
        r"\.weight has shape \(64, 32\), expected \(64, 64\)",
    ):
        checkpoint.load_checkpoint(write("shape", bad))

    missing = {k: v for k, v in flat.items() if "layers.2.temporal_block.v_proj" not in k}
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"missing tensor model\.layers\.2\.temporal_block\.v_proj\.weight "
        r"\(expected shape \(16, 64\)\)",
    ):
        checkpoint.load_checkpoint(write("missing", missing))

    extra = {**flat, "model.layers.0.temporal_block.surprise": np.zeros(2, np.float32)}
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected tensor .*surprise"):
        checkpoint.load_checkpoint(write("extra", extra))

    kv = {**hf_format.hf_config_dict(config), "num_key_value_heads": 4}
    with pytest.raises(checkpoint.CheckpointError, match="num_key_value_heads=4 is not supported"):
        checkpoint.load_checkpoint(write("kv", flat, kv))

    wide = {**hf_format.hf_config_dict(config), "hidden_size": 128}
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"width is 128 in .*config\.json but the parameters have 64",
    ):
        checkpoint.load_checkpoint(write("wide", flat, wide))

    no_config = write("no_config", flat, hf_config=False)
    with pytest.raises(checkpoint.CheckpointError, match=r"pass preset="):
        checkpoint.load_checkpoint(no_config)

    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"trunc/model\.safetensors: not a safetensors"
    ):
        checkpoint.load_checkpoint(str(tmp_path / "trunc"))

    with pytest.raises(checkpoint.CheckpointError, match=r"width is 64 in the checkpoint but 2560"):
        checkpoint.load_checkpoint(hf_model["single"], preset=Preset.RECURRENTGEMMA_2B)


def test_safetensors_file_errors(tmp_path):
    config = CONFIGS["griffin"]
    flat = hf_format.params_to_hf(
        config, dict(testing.iter_leaves(testing.random_params(config)))
    )
    fs = fsspec.filesystem("file")
    good = tmp_path / "good.safetensors"
    hf_format.write_safetensors(fs, str(good), flat)

    def write(name, data):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(data)
        (tmp_path / name / "config.json").write_text(
            json.dumps(hf_format.hf_config_dict(config))
        )
        return str(tmp_path / name)

    with pytest.raises(
        checkpoint.CheckpointError, match=r"cut/model\.safetensors: not a safetensors file"
    ):
        checkpoint.load_checkpoint(write("cut", good.read_bytes()[:-10]))  # inside the data
    with pytest.raises(
        checkpoint.CheckpointError, match=r"random/model\.safetensors: not a safetensors file"
    ):
        checkpoint.load_checkpoint(write("random", os.urandom(256)))

    # Strided views are written by value, not as their underlying buffer.
    base = np.arange(6, dtype=np.float32).reshape(2, 3)
    hf_format.write_safetensors(fs, str(tmp_path / "t.safetensors"), {"t": base.T})
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("t"), base.T)
    with pytest.raises(checkpoint.CheckpointError, match=r"bad\.safetensors: .*complex128"):
        hf_format.write_safetensors(
            fs, str(tmp_path / "bad.safetensors"), {"z": np.zeros(2, np.complex128)}
        )


# ---------------------------------------------------------------------------------------------
# Untrusted checkpoints stay in their place.


def _tree(root) -> list[str]:
    """Every path under ``root``, relative to it: what a load may not add to."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "name, reason",
    [
        ("", "is empty"),
        (3, "is a int"),
        ("a\0b.safetensors", "contains NUL"),
        ("sub\\x.safetensors", "contains a backslash"),
        ("\\\\host\\share\\x.safetensors", "contains a backslash"),  # UNC
        ("C:\\x.safetensors", "contains a backslash"),
        ("C:x.safetensors", "is absolute"),  # drive-relative: still leaves the directory
        ("/tmp/abs.safetensors", "is absolute"),
        ("..", "has a '..' component"),
        ("../evil.safetensors", "has a '..' component"),
        ("sub/../../x.safetensors", "has a '..' component"),
    ],
)
def test_safe_member_name_refuses_names_that_leave_the_checkpoint(name, reason):
    with pytest.raises(
        checkpoint.CheckpointError, match=re.escape(f"ckpt/index.json: entry {name!r} {reason}")
    ):
        common.safe_member_name(name, "ckpt/index.json")


@pytest.mark.parametrize("name", ["model.safetensors", "sub/model-1.safetensors", "a..b", "./x"])
def test_safe_member_name_keeps_names_inside_the_checkpoint(name):
    assert common.safe_member_name(name, "ckpt") == name


@pytest.mark.parametrize("where", ["memory", "local"])
@pytest.mark.parametrize(
    "entry", ["../evil.safetensors", "{tmp}/abs.safetensors", "sub/../../x.safetensors"]
)
def test_hf_index_cannot_name_files_outside_the_checkpoint(tmp_path, monkeypatch, where, entry):
    """A crafted weight_map entry is refused, naming it, before any file is looked up or copied.

    On memory:// the loader copies the shards into a temporary directory, and the
    crafted entry exists there as a key, so a loader without the check would
    copy it out of that directory. The absolute entry lies under tmp_path, not
    /tmp, so that such a loader would write where this test looks.
    """
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    entry = entry.format(tmp=tmp_path)
    index = {
        "metadata": {},
        "weight_map": {"model.embed_tokens.weight": "model-1.safetensors", "x.weight": entry},
    }
    files = {
        checkpoint.HF_INDEX_JSON: json.dumps(index).encode(),
        "config.json": json.dumps(hf_format.hf_config_dict(CONFIGS["griffin"])).encode(),
        "model-1.safetensors": b"",
    }
    fs = fsspec.filesystem("memory")
    if where == "memory":
        root, path = f"/crafted/{tmp_path.name}", f"memory://crafted/{tmp_path.name}"
        for name, data in {**files, entry: b"bait"}.items():
            fs.pipe(common.join(root, name), data)
    else:
        path = str(tmp_path / "ckpt")
        os.makedirs(path)
        for name, data in files.items():
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
    before = _tree(tmp_path)
    try:
        with pytest.raises(
            checkpoint.CheckpointError,
            match=re.escape(f"{path}/{checkpoint.HF_INDEX_JSON}: entry {entry!r} ")
            + r"(is absolute|has a '\.\.' component)",
        ):
            checkpoint.load_checkpoint(path)
    finally:
        if where == "memory":
            fs.rm(f"/crafted/{tmp_path.name}", recursive=True)
    assert _tree(tmp_path) == before and not os.listdir(scratch)


@pytest.mark.parametrize("entry", ["../../evil", "d/../../../x"])
def test_remote_orbax_listing_cannot_reach_outside_the_copy(tmp_path, monkeypatch, entry):
    """An object-store key with ".." in it is refused before the directory is copied.

    fsspec's memory filesystem holds such keys as they are and lists them under
    the checkpoint; each one here would land beside the temporary copy's
    directory if the listing were copied unchecked.
    """
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    fs = fsspec.filesystem("memory")
    root, path = f"/crafted/{tmp_path.name}", f"memory://crafted/{tmp_path.name}"
    fs.pipe(common.join(root, "_METADATA"), b"{}")
    fs.pipe(common.join(root, entry), b"bait")
    assert common.join(root, entry) in fs.find(root)  # the listing does hold the crafted key
    before = _tree(tmp_path)
    try:
        with pytest.raises(
            checkpoint.CheckpointError,
            match=re.escape(f"{path}: entry {entry!r} has a '..' component"),
        ):
            checkpoint.load_checkpoint(path)
    finally:
        fs.rm(root, recursive=True)
    assert _tree(tmp_path) == before and not os.listdir(scratch)


def test_local_orbax_link_out_of_the_checkpoint_is_refused(tmp_path):
    # A local orbax directory is read in place: a link inside it to a file outside would
    # make orbax read that file. Links that stay inside (or a linked root) are fine.
    config = CONFIGS["hawk"]
    params = testing.random_params(config, seed=11)
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(str(path), config, params)
    (path / "notes.txt").symlink_to(path / "config.json")
    (tmp_path / "alias").symlink_to(path, target_is_directory=True)
    _assert_trees_equal(checkpoint.load_checkpoint(str(tmp_path / "alias"))[1], params)

    (tmp_path / "secret").write_bytes(b"not a checkpoint")
    (path / "d" / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(
        checkpoint.CheckpointError,
        match=re.escape(f"{path}: entry {os.path.join('d', 'leak')!r} is a link to "),
    ):
        checkpoint.load_checkpoint(str(path))
