"""Per-row sampling inside the jitted step: greedy, temperature, top-k, top-p, per-request seeds, top-N logprobs.

Pure JAX. Each row's randomness comes from its own seed folded with the position being sampled, so a request
gives the same tokens whatever else shares its batch, and the same seed and prompt give the same output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

NEG_INF = -1e30


@struct.dataclass
class SamplingParams:
    """Per-row knobs, each [B]: temperature 0 means greedy; top_k 0 and top_p 1 mean no filter."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array


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


def sample(logits: jax.Array, params: SamplingParams, positions: jax.Array, num_logprobs: int) -> Sampled:
    """Draws one token per row from float32 logits [B, V]; `positions` [B] is the position being sampled.

    Logprobs are those of the unmodified model distribution (before temperature and filters), as vLLM reports.
    """
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # An all-greedy batch (the common serving case) skips the sort and the random draws entirely.
    token = jax.lax.cond(jnp.any(params.temperature > 0), _draw, lambda *_: greedy, logits, params, positions,
                         greedy)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    if num_logprobs:
        top_logprobs, top_tokens = jax.lax.top_k(logprobs, num_logprobs)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_tokens = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return Sampled(token, chosen, top_tokens.astype(jnp.int32), top_logprobs)
