"""jaxserve/kernels/logit_stats.py (greedy and logprob statistics on the CPU kernel): the numbers XLA's
reductions give, ties, padding ids and non-finite rows included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.kernels import build

if not build.available():
    pytest.skip(f"CPU kernels unavailable: {build.unavailable_reason()}", allow_module_level=True)

from jaxserve.kernels.logit_stats import logit_stats  # noqa: E402
from jaxserve.sampling import SamplingParams, sample  # noqa: E402


def _reference(logits: np.ndarray, valid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = logits[:, :valid].astype(np.float64)
    top = m.max(1)
    return top, m.argmax(1), np.log(np.exp(m - top[:, None]).sum(1))


@pytest.mark.parametrize(("rows", "vocab", "valid"), [(8, 32016, 32000), (3, 17, 17), (5, 100, 33), (1, 1, 1),
                                                      (2, 64, 64), (9, 15, 15), (4, 80, 79)])
def test_logit_stats_equal_float64_max_first_argmax_and_log_sum_exp(rows: int, vocab: int, valid: int) -> None:
    rng = np.random.default_rng(rows * vocab + valid)
    logits = (rng.standard_normal((rows, vocab)) * 5).astype(np.float32)
    logits[:, valid:] = 100.0  # padding ids are never the maximum, whatever they hold
    if valid > 40:
        logits[0, 3] = logits[0, 37] = logits[0, :valid].max() + 1  # a tie: the first id wins
        logits[-1, valid - 1] = logits[-1, :valid].max() + 1  # the maximum in the tail past the last full vector
    top, first, lse = (np.asarray(a) for a in jax.jit(logit_stats, static_argnums=1)(jnp.asarray(logits), valid))
    want_top, want_first, want_lse = _reference(logits, valid)
    np.testing.assert_array_equal(top, want_top.astype(np.float32))
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)


def test_non_finite_rows_give_what_xla_gives() -> None:
    logits = np.zeros((4, 40), np.float32)
    logits[0, 21] = np.nan  # no maximum: NaN, and the last id
    logits[1] = -np.inf  # all -inf: the first id
    logits[2, 30] = logits[2, 33] = np.inf  # an infinite maximum: its first id, a NaN log-sum-exp
    logits[3, 5] = 1.0
    top, first, lse = (np.asarray(a) for a in logit_stats(jnp.asarray(logits), 40))
    xla = sample(jnp.asarray(logits), SamplingParams(*(jnp.zeros(4, t) for t in (jnp.float32, jnp.int32)),
                                                     jnp.ones(4), jnp.zeros(4, jnp.uint32), jnp.zeros(4, jnp.int32)),
                 jnp.zeros(4, jnp.int32), 0)
    np.testing.assert_array_equal(first, np.asarray(xla.token))
    assert np.isnan(top[0]) and np.isnan(lse[0]) and first[0] == 39
    assert top[1] == -np.inf and first[1] == 0
    assert top[2] == np.inf and first[2] == 30 and np.isnan(lse[2])
    assert top[3] == 1.0 and first[3] == 5 and np.isclose(lse[3], np.log(np.e ** -1 * 39 + 1))


@pytest.mark.parametrize("valid", [1000, 990])
def test_sampling_on_the_kernel_equals_sampling_on_xla(valid: int) -> None:
    rng = np.random.default_rng(valid)
    logits = jnp.asarray((rng.standard_normal((6, 1000)) * 4).astype(np.float32))
    params = SamplingParams(jnp.array([0, 0, 0, 0.8, 0, 1.2], jnp.float32), jnp.array([0, 0, 0, 5, 0, 0], jnp.int32),
                            jnp.array([1, 1, 1, 1, 1, 0.9], jnp.float32), jnp.arange(6, dtype=jnp.uint32),
                            jnp.array([0, 3, 0, 0, 5, 1], jnp.int32))
    positions = jnp.arange(6, dtype=jnp.int32)
    want = jax.jit(lambda x: sample(x, params, positions, 5, valid))(logits)
    got = jax.jit(lambda x: sample(x, params, positions, 5, valid, logit_stats))(logits)
    np.testing.assert_array_equal(got.token, want.token)
    np.testing.assert_array_equal(got.top_tokens, want.top_tokens)
    np.testing.assert_allclose(got.logprob, want.logprob, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=1e-5, atol=1e-5)


def test_logit_stats_refuses_a_valid_count_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="valid must be in"):
        logit_stats(jnp.zeros((2, 8)), 9)
