"""Paged attention: write this step's keys and values into the KV pool, then attend over a sequence's pages.

One function serves prefill chunks and decode (decode is a chunk of one token, with a page-by-page inner
step), so chunked prefill and prefix reuse need no second code path. Pure JAX; pages are addressed through block
tables built by the KV allocator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.kernels.attention import paged_decode_attention, paged_prefill_attention

# Page 0 of every pool is never handed out: padded tokens and pipeline bubble ticks write their keys there.
TRASH_SLOT = 0
# Decode gathers all of a batch's pages at once while they total at most this many bytes per pool; past it the
# gathered copy falls out of the caches and a loop over page columns is faster (bench-110m on a 2-core CPU: batch 32
# 529 -> 317 ms per step), while for small working sets the loop's per-iteration cost loses (default model, batch 8:
# 7.3 -> 13.0 ms).
DECODE_GATHER_LIMIT = 2 << 20


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
    cpu_kernel: bool = False,
) -> jax.Array:
    """Causal grouped-query attention of a chunk of queries over the pages of their sequences.

    q: [B, T, Hkv, G, D] (G query heads per KV head); k_pool, v_pool: [num_pages, Hkv, page_size, D] already
    holding this chunk's keys (reading the updated pool keeps XLA's update in place); block_table: [B, n] page ids;
    positions: [B, T] absolute position of each query (-1 for padding). Returns [B, T, Hkv, G, D]. Key j of the
    gathered context is at absolute position j, so the causal mask is simply j <= position; pages past a
    sequence's end are masked by the same test. `cpu_kernel`: run on the CPU kernels, which read only the pages
    holding allowed keys, in place (jaxserve/kernels/attention.py).
    """
    if cpu_kernel:
        kernel = paged_decode_attention if q.shape[1] == 1 else paged_prefill_attention
        return kernel(q, k_pool, v_pool, block_table, positions, sliding_window)
    if q.shape[1] == 1:
        b, n = block_table.shape
        if b * n * k_pool[0].size * k_pool.dtype.itemsize > DECODE_GATHER_LIMIT:
            return _decode_attention_looped(q, k_pool, v_pool, block_table, positions, sliding_window)
        k, v = gather_pages(k_pool, block_table), gather_pages(v_pool, block_table)
        return _decode_attention_gathered(q, k, v, positions, sliding_window)
    k = gather_pages(k_pool, block_table)  # [B, n, Hkv, page_size, D]
    v = gather_pages(v_pool, block_table)
    b, n, h, p, d = k.shape
    k = k.transpose(0, 2, 1, 3, 4).reshape(b, h, n * p, d)  # [B, Hkv, S, D]
    v = v.transpose(0, 2, 1, 3, 4).reshape(b, h, n * p, d)
    scores = jnp.einsum("btkgd,bksd->bktgs", q, k, preferred_element_type=jnp.float32) * d ** -0.5
    allowed = _allowed(jnp.arange(n * p)[None, None, :], positions[:, :, None], sliding_window)  # [B, T, S]
    scores = jnp.where(allowed[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bktgs,bksd->btkgd", probs, v)


def _decode_attention_looped(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                      positions: jax.Array, sliding_window: int) -> jax.Array:
    """One query per row, one page at a time with an online softmax (flash-decoding style).

    Gathering all of a batch's pages at once materialises [B, n, Hkv, page_size, D] per layer, which falls out of
    the caches at larger batches (on XLA:CPU attention then cost more than the weight matmuls); a loop over page
    columns reads each page once into a working set of one page per row.
    """
    b, n = block_table.shape
    _, h, p, d = k_pool.shape
    groups = q.shape[3]
    query = q[:, 0] * d ** -0.5  # [B, Hkv, G, D]
    q_pos = positions[:, :1]  # [B, 1]
    lowest = jnp.finfo(jnp.float32).min

    def page(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        top, total, acc = carry  # [B, Hkv, G], [B, Hkv, G], [B, Hkv, G, D]
        pages = block_table[:, i]
        k, v = k_pool[pages], v_pool[pages]  # [B, Hkv, p, D]
        scores = jnp.einsum("bhgd,bhpd->bhgp", query, k, preferred_element_type=jnp.float32)
        allowed = _allowed(i * p + jnp.arange(p)[None, :], q_pos, sliding_window)[:, None, None, :]  # [B,1,1,p]
        scores = jnp.where(allowed, scores, lowest)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
        weights = jnp.where(allowed, jnp.exp(scores - new_top[..., None]), 0.0)
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(weights, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("bhgp,bhpd->bhgd", weights.astype(v.dtype), v,
                                                    preferred_element_type=jnp.float32)
        return new_top, total, acc

    init = (jnp.full((b, h, groups), lowest), jnp.zeros((b, h, groups)), jnp.zeros((b, h, groups, d)))
    _, total, acc = jax.lax.fori_loop(0, n, page, init)
    # A padding row (position -1) attends to nothing: its total is 0 and its output is discarded.
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return out[:, None].astype(q.dtype)  # [B, 1, Hkv, G, D]


def _decode_attention_gathered(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, sliding_window: int
                               ) -> jax.Array:
    """One query per row over all its pages gathered at once, as batched matmuls over (row, page, head).

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
