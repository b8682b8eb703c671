"""bfloat16 against float32 on the reference workload, and the default compute dtype.

Workers compute in bfloat16 on TPU and GPU unless ``--dtype`` says otherwise
(``griffin_batch.model.dtypes``); this checks on CPU that doing so keeps the
logits close to float32's.

Tolerances (bfloat16 logits against float32 logits, same parameters rounded to
bfloat16; the workload's logits have a standard deviation near 1 and reach
about +-13):
  * BF16_MAX_ABS: largest absolute difference. bfloat16 keeps 8 significant
    bits, so every matmul and norm moves values by up to ~0.4% of their size.
    The bound is about twice what DeepMind's reference model itself showed
    in bfloat16 on this input when last measured (too slow to rerun here;
    test_griffin.py holds ours to the reference's bfloat16 error on small configs).
  * BF16_MEAN_ABS: mean absolute difference.
  * GREEDY_AGREEMENT: fraction of positions whose argmax token is the same.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common
from griffin_batch.model import dtypes, griffin

BF16_MAX_ABS = 0.3
BF16_MEAN_ABS = 0.03
GREEDY_AGREEMENT = 0.98


def test_bfloat16_logits_match_float32_on_the_reference_workload():
    config = common.workload_config()
    p32 = common.workload_params(config)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    tokens = np.array(common.token_prompts(2, 64, config.vocab_size, seed=3))
    l32 = np.asarray(griffin.forward_logits(config, p32, tokens))
    l16 = np.asarray(griffin.forward_logits(config, p16, tokens), np.float32)
    diff = np.abs(l16 - l32)
    agree = float(np.mean(l16.argmax(-1) == l32.argmax(-1)))
    print(f"bfloat16 vs float32 logits: max|diff| {diff.max():.3f} (tol {BF16_MAX_ABS}), "
          f"mean {diff.mean():.4f} (tol {BF16_MEAN_ABS}), greedy agreement {agree:.3f} "
          f"(min {GREEDY_AGREEMENT}); float32 logits std {l32.std():.2f}, "
          f"max|logit| {np.abs(l32).max():.1f}")
    assert np.isfinite(l16).all()
    assert diff.max() <= BF16_MAX_ABS
    assert diff.mean() <= BF16_MEAN_ABS
    assert agree >= GREEDY_AGREEMENT


@pytest.mark.parametrize("platform", ["tpu", "gpu", "cuda", "rocm", "TPU"])
def test_accelerators_compute_in_bfloat16_by_default(platform):
    assert dtypes.compute_dtype(None, platform) == "bfloat16"


def test_cpu_keeps_the_stored_dtype_by_default():
    assert dtypes.compute_dtype(None, "cpu") is None


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("requested", ["float32", "bfloat16"])
def test_a_requested_dtype_wins_everywhere(requested, platform):
    assert dtypes.compute_dtype(requested, platform) == requested
