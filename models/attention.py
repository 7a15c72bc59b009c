"""Paged attention: write this step's keys and values into the KV pool, then attend over a sequence's pages.

One function serves prefill chunks and decode (decode is a chunk of one token), so chunked prefill and prefix reuse
need no second code path. Pure JAX; pages are addressed through block tables built by the KV allocator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Page 0 of every pool is never handed out: padded tokens and pipeline bubble ticks write their keys there.
TRASH_SLOT = 0


def write_kv(pool: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatters new keys or values into the pool.

    pool: [kv_heads, num_slots, head_dim] (num_slots = num_pages * page_size); new: [B, T, kv_heads, head_dim];
    slots: [B, T] flat slot index (page * page_size + offset), TRASH_SLOT for padding.
    """
    b, t, h, d = new.shape
    rows = new.reshape(b * t, h, d).transpose(1, 0, 2).astype(pool.dtype)  # [H, B*T, D]
    return pool.at[:, slots.reshape(b * t)].set(rows, mode="promise_in_bounds")


def gather_pages(pool: jax.Array, block_table: jax.Array, page_size: int) -> jax.Array:
    """Reads the pages a batch uses: [H, num_slots, D] -> [H, B, pages * page_size, D] in sequence order.

    Heads lead both the pool and the result so the attention matmuls batch over (head, row) with no transpose of
    the keys and values (a [B, S, H, D] context decoded ~3x slower on XLA:CPU).
    """
    h, num_slots, d = pool.shape
    pages = pool.reshape(h, num_slots // page_size, page_size, d)[:, block_table]  # [H, B, n, page_size, D]
    b, n = block_table.shape
    return pages.reshape(h, b, n * page_size, d)


def paged_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    block_table: jax.Array,
    positions: jax.Array,
    page_size: int,
    sliding_window: int = 0,
) -> jax.Array:
    """Causal grouped-query attention of a chunk of queries over the pages of their sequences.

    q: [B, T, Hkv, G, D] (G query heads per KV head); k_pool, v_pool: [Hkv, num_slots, D] already holding this
    chunk's keys; block_table: [B, n] page ids; positions: [B, T] absolute position of each query (-1 for padding).
    Returns [B, T, Hkv, G, D]. Key j of the gathered context is at absolute position j, so the causal mask is
    simply j <= position; pages past a sequence's end are masked by the same test.
    """
    k = gather_pages(k_pool, block_table, page_size)  # [Hkv, B, S, D]
    v = gather_pages(v_pool, block_table, page_size)
    q = q.transpose(2, 0, 1, 3, 4)  # [Hkv, B, T, G, D]
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("kbtgd,kbsd->kbtgs", q, k, preferred_element_type=jnp.float32) * scale
    key_pos = jnp.arange(k.shape[2])[None, None, :]  # [1, 1, S]
    q_pos = positions[:, :, None]  # [B, T, 1]
    allowed = key_pos <= q_pos
    if sliding_window:
        allowed &= key_pos > q_pos - sliding_window
    scores = jnp.where(allowed[None, :, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("kbtgs,kbsd->kbtgd", probs, v)
    return out.transpose(1, 2, 0, 3, 4)
