"""Per-row sampling inside the jitted step: greedy, temperature, top-k, top-p, per-request seeds, top-N logprobs.

Pure JAX. Each row's randomness comes from its own seed folded with the position being sampled, so a request
gives the same tokens whatever else shares its batch, and the same seed and prompt give the same output.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

NEG_INF = -1e30

# (logits [B, V], valid ids) -> (max [B], first id of the max [B], log-sum-exp of logits - max [B]).
RowStats = Callable[[jax.Array, int], tuple[jax.Array, jax.Array, jax.Array]]


@struct.dataclass
class SamplingParams:
    """Per-row knobs, each [B]: temperature 0 means greedy; top_k 0 and top_p 1 mean no filter; logprobs is how
    many top alternatives the row wants (the step computes them only when some row wants any)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    logprobs: jax.Array


@struct.dataclass
class Sampled:
    """What one step sends back to the host: ids [B], their logprobs [B], top-N ids and logprobs [B, N]."""

    token: jax.Array
    logprob: jax.Array
    top_tokens: jax.Array
    top_logprobs: jax.Array


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks logits [B, V] outside each row's top-k and nucleus (top-p) set; one sort serves both filters."""
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, top_k, vocab)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, NEG_INF), axis=-1)
    # Keep a token while the mass strictly before it is below top_p, so the most likely token always survives.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < top_p[:, None]
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def _draw(logits: jax.Array, params: SamplingParams, positions: jax.Array, greedy: jax.Array) -> jax.Array:
    """Temperature, top-k / top-p filtering and a seeded draw for rows with temperature > 0; greedy elsewhere."""
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    scaled = logits / temperature[:, None]
    needs_filter = jnp.any((params.top_k > 0) | (params.top_p < 1.0))
    scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda x, *_: x, scaled, params.top_k, params.top_p)
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(params.seed, positions)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(params.temperature > 0, drawn, greedy)


def sample(logits: jax.Array, params: SamplingParams, positions: jax.Array, num_logprobs: int,
           valid: int | None = None, row_stats: RowStats | None = None) -> Sampled:
    """Draws one token per row from float32 logits [B, V]; `positions` [B] is the position being sampled.

    Logprobs are those of the unmodified model distribution (before temperature and filters), as vLLM reports; the
    top `num_logprobs` alternatives are computed only when some row's `params.logprobs` asks for them (zeros
    otherwise), since a top-k over the vocabulary costs as much as the rest of sampling.

    `valid`: only ids below it can be drawn or reported (the rest are padding rows of the vocabulary).
    `row_stats(logits, valid)` -> (max, first id of the max, log-sum-exp of logits - max) per row, when given,
    computes what greedy decoding and logprobs need in one pass (the CPU kernel, `kernels.logit_stats`); the padding
    is then masked only on the paths that read the whole distribution (drawing, top-N).

    Every pass over [B, V] here is a plain reduction: on XLA:CPU `argmax` and `log_softmax` followed by a gather run
    2-3x slower than the max, exp-sum and masked min they are rewritten into (6 -> ~2 ms at 32 x 32000).
    """
    vocab = logits.shape[-1]
    valid = vocab if valid is None else valid

    def masked() -> jax.Array:
        return logits if valid == vocab else jnp.where(jnp.arange(vocab) < valid, logits, -jnp.inf)

    if row_stats is not None:
        top, greedy, log_total = row_stats(logits, valid)
        top = top[:, None]
    else:
        full = masked()
        top = jnp.max(full, axis=-1, keepdims=True)
        log_total = jnp.log(jnp.sum(jnp.exp(full - top), axis=-1))  # the log_softmax of jax.nn, term for term
        # First index of each row's maximum, like argmax (a NaN row, which has no maximum, gives the last id).
        greedy = jnp.min(jnp.where(full == top, jnp.arange(vocab, dtype=jnp.int32), vocab - 1), axis=-1)
    top = jax.lax.stop_gradient(top)
    # An all-greedy batch (the common serving case) skips the sort and the random draws entirely.
    token = jax.lax.cond(jnp.any(params.temperature > 0), lambda: _draw(masked(), params, positions, greedy),
                         lambda: greedy)
    chosen = (jnp.take_along_axis(logits, token[:, None], axis=-1) - top)[:, 0] - log_total
    b = logits.shape[0]
    if num_logprobs:
        def top_n() -> tuple[jax.Array, jax.Array]:
            values, ids = jax.lax.top_k(masked() - top, num_logprobs)
            return values - log_total[:, None], ids.astype(jnp.int32)

        def none() -> tuple[jax.Array, jax.Array]:
            return jnp.zeros((b, num_logprobs), jnp.float32), jnp.zeros((b, num_logprobs), jnp.int32)

        top_logprobs, top_tokens = jax.lax.cond(jnp.any(params.logprobs > 0), top_n, none)
    else:
        top_logprobs, top_tokens = jnp.zeros((b, 0), jnp.float32), jnp.zeros((b, 0), jnp.int32)
    return Sampled(token, chosen, top_tokens, top_logprobs)
