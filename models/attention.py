"""Paged attention: write this step's keys and values into the KV pool, then attend over a sequence's pages.

One function serves prefill chunks and decode (decode is a chunk of one token, with a layout-specialised inner
step), so chunked prefill and prefix reuse need no second code path. Pure JAX; pages are addressed through block
tables built by the KV allocator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Page 0 of every pool is never handed out: padded tokens and pipeline bubble ticks write their keys there.
TRASH_SLOT = 0


def write_kv(pool: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatters new keys or values into the pool (in place when the pool is donated).

    pool: [num_pages, kv_heads, page_size, head_dim]; new: [B, T, kv_heads, head_dim]; slots: [B, T] flat slot
    index (page * page_size + offset), TRASH_SLOT for padding. B * T must be at least 2: XLA rewrites a one-row
    scatter as a guarded dynamic-update-slice that it then copies the whole pool for (the runner pads decode to
    two rows).
    """
    b, t, h, d = new.shape
    page_size = pool.shape[2]
    flat = slots.reshape(b * t)
    rows = new.reshape(b * t, h, d).astype(pool.dtype)
    return pool.at[flat // page_size, :, flat % page_size].set(rows, mode="promise_in_bounds")


def gather_pages(pool: jax.Array, block_table: jax.Array) -> jax.Array:
    """Reads the pages a batch uses: [num_pages, H, page_size, D] -> [B, n, H, page_size, D].

    Each page is one contiguous block of the pool, so this is a plain row gather (XLA:CPU's fast case).
    """
    return pool[block_table]


def _allowed(key_pos: jax.Array, q_pos: jax.Array, sliding_window: int) -> jax.Array:
    allowed = key_pos <= q_pos
    if sliding_window:
        allowed &= key_pos > q_pos - sliding_window
    return allowed


def paged_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    block_table: jax.Array,
    positions: jax.Array,
    sliding_window: int = 0,
) -> jax.Array:
    """Causal grouped-query attention of a chunk of queries over the pages of their sequences.

    q: [B, T, Hkv, G, D] (G query heads per KV head); k_pool, v_pool: [num_pages, Hkv, page_size, D] already
    holding this chunk's keys (reading the updated pool keeps XLA's update in place); block_table: [B, n] page ids;
    positions: [B, T] absolute position of each query (-1 for padding). Returns [B, T, Hkv, G, D]. Key j of the
    gathered context is at absolute position j, so the causal mask is simply j <= position; pages past a
    sequence's end are masked by the same test.
    """
    k = gather_pages(k_pool, block_table)  # [B, n, Hkv, page_size, D]
    v = gather_pages(v_pool, block_table)
    if q.shape[1] == 1:
        return _decode_attention(q, k, v, positions, sliding_window)
    b, n, h, p, d = k.shape
    k = k.transpose(0, 2, 1, 3, 4).reshape(b, h, n * p, d)  # [B, Hkv, S, D]
    v = v.transpose(0, 2, 1, 3, 4).reshape(b, h, n * p, d)
    scores = jnp.einsum("btkgd,bksd->bktgs", q, k, preferred_element_type=jnp.float32) * d ** -0.5
    allowed = _allowed(jnp.arange(n * p)[None, None, :], positions[:, :, None], sliding_window)  # [B, T, S]
    scores = jnp.where(allowed[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bktgs,bksd->btkgd", probs, v)


def _decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, sliding_window: int
                      ) -> jax.Array:
    """One query per row, computed page by page as batched matmuls over (row, page, head).

    Uses the gathered pages [B, n, Hkv, page_size, D] in the layout the gather produced: no transpose copies of
    the keys or values, which on XLA:CPU cost more than the attention arithmetic itself.
    """
    b, n, h, p, d = k.shape
    groups = q.shape[3]
    qb = jnp.broadcast_to(q[:, 0][:, None], (b, n, h, groups, d))  # [B, n, Hkv, G, D]
    batch = ((0, 1, 2), (0, 1, 2))
    scores = jax.lax.dot_general(qb, k, (((4,), (4,)), batch), preferred_element_type=jnp.float32) * d ** -0.5
    key_pos = jnp.arange(n * p).reshape(n, p)[None]  # [1, n, p]
    allowed = _allowed(key_pos, positions[:, :1, None], sliding_window)  # [B, n, p]
    scores = jnp.where(allowed[:, :, None, None, :], scores, jnp.finfo(jnp.float32).min)  # [B, n, Hkv, G, p]
    top = jnp.max(scores, axis=(1, 4), keepdims=True)
    weights = jnp.exp(scores - top)
    probs = (weights / jnp.sum(weights, axis=(1, 4), keepdims=True)).astype(v.dtype)
    out = jax.lax.dot_general(probs, v, (((4,), (3,)), batch))  # [B, n, Hkv, G, D]
    return jnp.sum(out, axis=1)[:, None]  # [B, 1, Hkv, G, D]
