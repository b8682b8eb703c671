"""Per-row token sampling: greedy, temperature, top-k, top-p and the per-row random stream.

Draws are checked over many token indices at once (one row per index), so the
statistics are exact functions of fixed keys: deterministic, not flaky.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from griffin_batch.model import sampling
from griffin_batch.model.sampling import RowParams, _filter_top_k_top_p, token_keys

VOCAB = 64
DRAWS = 4000
FREQ_TOL = 0.03  # |empirical - expected| frequency over DRAWS draws (~4 sigma)
sample_tokens = jax.jit(sampling.sample_tokens)  # as the engine calls it; eager is slow


def rows(n, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, sample_index=0) -> RowParams:
    def col(value, dtype):
        return jnp.broadcast_to(jnp.asarray(value, dtype), (n,))

    return RowParams(
        temperature=col(temperature, jnp.float32),
        top_k=col(top_k, jnp.int32),
        top_p=col(top_p, jnp.float32),
        seed=jnp.broadcast_to(jnp.asarray(sampling.seed_words(seed), jnp.uint32), (n, 2)),
        sample_index=col(sample_index, jnp.int32),
    )


def stack(*parts: RowParams) -> RowParams:
    return jax.tree.map(lambda *x: jnp.concatenate(x), *parts)


def random_logits(n=1, seed=0) -> jax.Array:
    return 2.0 * jax.random.normal(jax.random.PRNGKey(seed), (n, VOCAB))


def draws(logits_row, params: RowParams, n=DRAWS):
    """Tokens for token indices 0..n-1 of one row (same logits each time)."""
    logits = jnp.broadcast_to(logits_row, (n, VOCAB))
    tokens, _ = sample_tokens(logits, params, jnp.arange(n, dtype=jnp.int32))
    return np.asarray(tokens)


def test_greedy_rows_take_the_argmax_and_report_logprobs():
    logits = random_logits(8)
    tokens, logprobs = sample_tokens(logits, rows(8, temperature=0.0), jnp.arange(8))
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
    want = jax.nn.log_softmax(logits)[jnp.arange(8), tokens]
    np.testing.assert_allclose(logprobs, want, atol=1e-6)


def test_argmax_takes_the_first_maximum_and_stays_in_range():
    logits = jnp.array([[0.0, 3.0, 3.0, 1.0],  # tie: first index, as jnp.argmax
                        [5.0, -1.0, 5.0, 5.0],
                        [-2.0, -3.0, -1.0, -1.5],
                        [jnp.nan] * 4])  # no maximum: an id, never out of range
    got = np.asarray(jax.jit(sampling.argmax)(logits))
    np.testing.assert_array_equal(got[:3], np.asarray(jnp.argmax(logits[:3], -1)))
    assert 0 <= got[3] < 4


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = random_logits()[0]
    argmax = int(jnp.argmax(logits))
    assert set(draws(logits, rows(DRAWS, top_k=1))) == {argmax}
    assert set(draws(logits, rows(DRAWS, top_p=1e-6))) == {argmax}
    assert len(set(draws(logits, rows(DRAWS)))) > 10  # while plain sampling is not


def test_temperature_draws_follow_the_tempered_distribution():
    logits = random_logits(seed=1)[0]
    for temperature in (0.5, 1.0, 2.0):
        got = np.bincount(draws(logits, rows(DRAWS, temperature=temperature)), minlength=VOCAB)
        want = np.asarray(jax.nn.softmax(logits / temperature))
        assert np.max(np.abs(got / DRAWS - want)) < FREQ_TOL, temperature


def test_top_k_keeps_the_k_most_likely():
    logits = random_logits(seed=2)[0]
    top = set(np.argsort(-np.asarray(logits))[:5].tolist())
    got = draws(logits, rows(DRAWS, top_k=5, temperature=2.0))
    assert set(got) == top  # only those, and every one of them
    want = np.asarray(
        jax.nn.softmax(
            jnp.where(jnp.isin(jnp.arange(VOCAB), jnp.array(list(top))), logits / 2.0, -jnp.inf)
        )
    )
    assert np.max(np.abs(np.bincount(got, minlength=VOCAB) / DRAWS - want)) < FREQ_TOL


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    logits = jnp.log(jnp.asarray(np.concatenate([probs, np.full(VOCAB - 4, 1e-9)])))
    # Mass before each sorted token: 0, .5, .75, .9 -> top_p=0.7 keeps 2, 0.8 keeps 3.
    assert set(draws(logits, rows(DRAWS, top_p=0.7))) == {0, 1}
    assert set(draws(logits, rows(DRAWS, top_p=0.8))) == {0, 1, 2}
    got = np.bincount(draws(logits, rows(DRAWS, top_p=0.8)), minlength=4)[:3] / DRAWS
    np.testing.assert_allclose(got, probs[:3] / probs[:3].sum(), atol=FREQ_TOL)


def test_a_row_draws_the_same_whatever_its_batch_mates():
    logits = random_logits(3, seed=4)
    me = rows(1, temperature=0.9, top_p=0.95, seed=7, sample_index=2)
    index = jnp.array([5], jnp.int32)
    alone, alone_lp = sample_tokens(logits[:1], me, index)
    for mates in (rows(2, temperature=0.0), rows(2, top_k=3, seed=1), rows(2, top_p=0.5)):
        both, both_lp = sample_tokens(logits, stack(me, mates), jnp.array([5, 0, 9], jnp.int32))
        assert int(both[0]) == int(alone[0]) and float(both_lp[0]) == float(alone_lp[0])
    # Over many indices, so that a mate-dependent draw would show.
    logits_row = logits[0]
    mine = draws(logits_row, rows(DRAWS, temperature=0.9, top_p=0.95, seed=7, sample_index=2))
    n = DRAWS
    mixed = stack(me, rows(1, top_k=2))
    tokens, _ = sample_tokens(
        jnp.broadcast_to(logits_row, (2 * n, VOCAB)),
        jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), mixed),
        jnp.concatenate([jnp.arange(n), jnp.arange(n)]).astype(jnp.int32),
    )
    np.testing.assert_array_equal(np.asarray(tokens[:n]), mine)


def test_unfiltered_row_keeps_every_token_beside_a_filtering_row():
    # One token holds all the float32 mass, so the running mass reaches 1.0 at once;
    # a row with top_p = 1 must still keep the tail when a batch mate filters.
    logits = jnp.array([[30.0] + [0.0] * (VOCAB - 1)] * 2)
    kept = _filter_top_k_top_p(logits, jnp.array([0, 2]), jnp.array([1.0, 0.5]))
    assert bool(jnp.all(jnp.isfinite(kept[0])))
    assert int(jnp.sum(jnp.isfinite(kept[1]))) == 1


def test_random_stream_depends_only_on_seed_sample_and_index():
    seeds = jnp.array([sampling.seed_words(s) for s in (1, 1, 2, 1)], jnp.uint32)
    samples = jnp.array([0, 1, 0, 0], jnp.int32)
    index = jnp.array([3, 3, 3, 4], jnp.int32)
    keys = jax.random.key_data(token_keys(seeds, samples, index))
    single = jax.random.key_data(token_keys(seeds[:1], samples[:1], index[:1]))
    np.testing.assert_array_equal(keys[0], single[0])
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == 4
    logits = random_logits()[0]
    a = draws(logits, rows(DRAWS, seed=1))
    assert (a == draws(logits, rows(DRAWS, seed=1))).all()
    assert (a != draws(logits, rows(DRAWS, seed=2))).mean() > 0.5
    assert (a != draws(logits, rows(DRAWS, seed=1, sample_index=1))).mean() > 0.5
    # All 64 bits count: seeds equal in their low word draw differently.
    assert (a != draws(logits, rows(DRAWS, seed=1 + 2**32))).mean() > 0.5
    assert (a != draws(logits, rows(DRAWS, seed=2**64 - 1))).mean() > 0.5


def test_logprobs_are_of_the_untempered_unfiltered_model():
    logits = random_logits(4, seed=5)
    params = stack(
        rows(1, temperature=2.0), rows(1, top_k=3), rows(1, top_p=0.3), rows(1, temperature=0.0)
    )
    tokens, logprobs = sample_tokens(logits, params, jnp.zeros(4, jnp.int32))
    want = jax.nn.log_softmax(logits)[jnp.arange(4), tokens]
    np.testing.assert_allclose(logprobs, want, atol=1e-6)


def test_a_tiny_temperature_is_near_greedy_not_undefined():
    """Logits / 1e-38 overflow float32 to +inf for every positive logit; shifted to a maximum
    of 0 first, only the best token stays finite."""
    logits = jnp.array([[1.0, 3.0, 2.5] + [-1.0] * (VOCAB - 3)])
    for temperature in (1e-38, 1e-30, 1e-12):
        tokens = draws(logits[0], rows(64, temperature=temperature), n=64)
        assert set(tokens.tolist()) == {1}, temperature
