"""Sampling inside the step: greedy, seeded draws, top-k / top-p filters, logprobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampling import SamplingParams, sample


def _params(b: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
            logprobs: int = 5) -> SamplingParams:
    return SamplingParams(jnp.full((b,), temperature, jnp.float32), jnp.full((b,), top_k, jnp.int32),
                          jnp.full((b,), top_p, jnp.float32), jnp.arange(seed, seed + b, dtype=jnp.uint32),
                          jnp.full((b,), logprobs, jnp.int32))


LOGITS = jnp.asarray(np.random.RandomState(0).randn(4, 50).astype(np.float32) * 3)


def test_greedy_is_argmax_and_logprobs_are_log_softmax() -> None:
    out = sample(LOGITS, _params(4), jnp.zeros(4, jnp.int32), 5)
    np.testing.assert_array_equal(out.token, np.argmax(LOGITS, -1))
    ref = jax.nn.log_softmax(LOGITS)
    np.testing.assert_allclose(out.logprob, ref[np.arange(4), out.token], rtol=1e-6)
    np.testing.assert_allclose(out.top_logprobs, np.sort(ref, -1)[:, ::-1][:, :5], rtol=1e-6)


def test_top_logprobs_are_computed_only_when_a_row_asks() -> None:
    rows = jnp.zeros(4, jnp.int32)
    nobody = sample(LOGITS, _params(4, logprobs=0), rows, 5)
    assert not np.asarray(nobody.top_logprobs).any() and not np.asarray(nobody.top_tokens).any()
    one = _params(4, logprobs=0).replace(logprobs=jnp.array([0, 0, 2, 0], jnp.int32))
    out = sample(LOGITS, one, rows, 5)
    np.testing.assert_array_equal(out.top_tokens, np.argsort(-np.asarray(LOGITS), -1)[:, :5])
    np.testing.assert_allclose(out.logprob, nobody.logprob)  # the chosen token's logprob does not depend on it


def test_greedy_takes_the_first_of_tied_maxima() -> None:
    logits = jnp.array([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -3.0, -1.0, -jnp.inf]], jnp.float32)
    np.testing.assert_array_equal(sample(logits, _params(3), jnp.zeros(3, jnp.int32), 0).token, [1, 0, 0])


@pytest.mark.parametrize("knob", [{"top_k": 1}, {"top_p": 1e-6}])
def test_tightest_filters_reduce_to_greedy(knob: dict) -> None:
    out = sample(LOGITS, _params(4, temperature=1.5, **knob), jnp.zeros(4, jnp.int32), 0)
    np.testing.assert_array_equal(out.token, np.argmax(LOGITS, -1))


def test_same_seed_and_position_draw_the_same_token_and_others_differ() -> None:
    draws = [sample(LOGITS, _params(4, temperature=1.0, seed=s), jnp.full(4, p, jnp.int32), 0).token
             for s, p in [(0, 3), (0, 3), (9, 3), (0, 4)]]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2]) or not np.array_equal(draws[0], draws[3])


def test_top_k_and_top_p_keep_draws_inside_their_sets() -> None:
    logits = jnp.tile(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), (256, 1))
    positions = jnp.arange(256, dtype=jnp.int32)
    k2 = sample(logits, _params(256, temperature=1.0, top_k=2), positions, 0).token
    assert set(np.asarray(k2)) == {0, 1}
    p = sample(logits, _params(256, temperature=1.0, top_p=0.7), positions, 0).token
    assert set(np.asarray(p)) == {0, 1}  # 0.5 < 0.7 keeps token 1; 0.8 >= 0.7 drops token 2


def test_temperature_one_matches_the_model_distribution() -> None:
    probs = np.array([0.6, 0.25, 0.1, 0.05])
    n = 4000
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 1))
    tokens = np.asarray(sample(logits, _params(n, temperature=1.0), jnp.zeros(n, jnp.int32), 0).token)
    freq = np.bincount(tokens, minlength=4) / n
    np.testing.assert_allclose(freq, probs, atol=0.03)  # ~4 standard errors at n=4000


def test_ids_past_valid_are_never_drawn_or_reported_and_carry_no_probability() -> None:
    logits = np.asarray(LOGITS).copy()
    logits[:, 45:] = 50.0  # padding rows of the vocabulary with the highest logits
    rows = jnp.zeros(4, jnp.int32)
    for params in (_params(4), _params(4, temperature=2.0), _params(4, temperature=1.0, top_p=0.99)):
        out = sample(jnp.asarray(logits), params, rows, 5, valid=45)
        assert (np.asarray(out.token) < 45).all() and (np.asarray(out.top_tokens) < 45).all()
    out = sample(jnp.asarray(logits), _params(4), rows, 5, valid=45)
    ref = jax.nn.log_softmax(LOGITS[:, :45])
    np.testing.assert_array_equal(out.token, np.argmax(LOGITS[:, :45], -1))
    np.testing.assert_allclose(out.logprob, ref[np.arange(4), out.token], rtol=1e-6)
    np.testing.assert_allclose(out.top_logprobs, np.sort(ref, -1)[:, ::-1][:, :5], rtol=1e-6)
