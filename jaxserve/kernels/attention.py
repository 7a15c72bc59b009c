"""Paged decode and prefill attention on the CPU kernels (see cpu/attention.cc and cpu/prefill_attention.cc for
why kernels).

Same semantics as `models.attention.paged_attention`: decode (one query per row, online softmax over the row's
pages) and prefill chunks (T queries per row, each masked by its own position); the kernels read only the pages
holding allowed keys, in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check(q_shape: tuple[int, ...], k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
           positions: jax.Array, sliding_window: int) -> None:
    """Validates what every attention kernel takes (q [B, T, Hkv, G, D], rank checked by the caller)."""
    if k_pool.ndim != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be [num_pages, Hkv, page_size, D], got {k_pool.shape} and "
                         f"{v_pool.shape}")
    if k_pool.dtype != jnp.float32 or v_pool.dtype != jnp.float32:
        raise ValueError(f"k_pool and v_pool must be float32, got {k_pool.dtype} and {v_pool.dtype}")
    b, t, h, _, d = q_shape
    if (k_pool.shape[1], k_pool.shape[3]) != (h, d):
        raise ValueError(f"pools' Hkv and D {k_pool.shape[1], k_pool.shape[3]} differ from q's {h, d}")
    if block_table.ndim != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [B={b}, n], got shape {block_table.shape}")
    if positions.shape != (b, t):
        raise ValueError(f"positions must be [B={b}, {t}], got shape {positions.shape}")
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = full attention), got {sliding_window}")


def _call(target: str, q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
          positions: jax.Array, sliding_window: int) -> jax.Array:
    """Validates the operands and calls `target`, a decode or prefill attention kernel."""
    _check(q.shape, k_pool, v_pool, block_table, positions, sliding_window)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), k_pool, v_pool, block_table.astype(jnp.int32), positions.astype(jnp.int32),
               sliding_window=np.int32(sliding_window))
    return out.astype(q.dtype)


def paged_decode_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    block_table: jax.Array,
    positions: jax.Array,
    sliding_window: int = 0,
) -> jax.Array:
    """Grouped-query attention of one query per row over the pages of its sequence.

    q: [B, 1, Hkv, G, D]; k_pool, v_pool: [num_pages, Hkv, page_size, D] float32, already holding this step's
    keys and values; block_table: [B, n] page ids; positions: [B, 1] absolute position of the query (-1 for a
    padding row, whose output is zeros). Key j is allowed iff j <= position and, with a sliding window,
    j > position - sliding_window. Returns [B, 1, Hkv, G, D] in q's dtype.

    A position needing more than n pages attends over the n columns the table has. Only the columns holding
    allowed keys are read, so unused columns may hold anything; a page id outside [0, num_pages) in a column that
    is read fails the call (InvalidArgument from the kernel) rather than being clamped: a corrupt block table is
    a bug upstream, and clamping would hide it behind plausible-looking output.
    """
    if q.ndim != 5 or q.shape[1] != 1:
        raise ValueError(f"q must be [B, 1, Hkv, G, D], got shape {q.shape}")
    return _call("jaxserve_paged_decode_attention", q, k_pool, v_pool, block_table, positions, sliding_window)


def paged_decode_attention_write(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    block_table: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    sliding_window: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`paged_decode_attention` for a step whose keys and values are not in the pools yet, in one call.

    qkv: [B, 1, Hkv * (G + 2), D], the q/k/v projections' output as the packed projection gives it, before RoPE:
    each row's Hkv * G query heads (KV head-major, as q's [Hkv, G]), then its Hkv keys, then its Hkv values (Hkv
    from the pools). cos, sin: [B, 1, D] RoPE tables (half-split convention, as `models.llama.apply_rope`); slots:
    [B, 1] flat pool slot (page * page_size + offset) of each row's new key. The call applies RoPE to the queries
    and keys, writes the keys and values at their slots (padding rows, position -1, write nothing) and attends.
    Returns (out [B, 1, Hkv, G, D], k_pool, v_pool): the pools updated in place (aliased), as XLA's scatter into a
    donated pool would leave them. A slot outside the pools for a real row fails the call (InvalidArgument), like a
    bad page id.

    The pools may also be [1, num_pages, Hkv, page_size, D], the runner's per-device pools with their stage axis,
    and come back so. Why: given a squeeze of a donated pool, XLA copies the whole pool before an in-place call
    (a 1.1 s bench-110m step instead of ~30 ms), where it updates the pool itself in place for a scatter.
    """
    if k_pool.ndim == 5 and k_pool.shape[0] != 1:
        raise ValueError(f"5-d pools must lead with a stage axis of 1, got shape {k_pool.shape}")
    if k_pool.ndim not in (4, 5) or k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be [num_pages, Hkv, page_size, D] (optionally with a stage "
                         f"axis of 1), got {k_pool.shape} and {v_pool.shape}")
    h, d = k_pool.shape[-3], k_pool.shape[-1]
    if qkv.ndim != 4 or qkv.shape[1] != 1 or qkv.shape[3] != d or qkv.shape[2] % h or qkv.shape[2] < 3 * h:
        raise ValueError(f"qkv must be [B, 1, Hkv * (G + 2), D] with the pools' Hkv = {h} and D = {d}, got shape "
                         f"{qkv.shape}")
    b, groups = qkv.shape[0], qkv.shape[2] // h - 2
    for name, a in (("cos", cos), ("sin", sin)):
        if a.shape != (b, 1, d):
            raise ValueError(f"{name} must be [B, 1, D] = {(b, 1, d)}, got shape {a.shape}")
    if slots.shape != (b, 1):
        raise ValueError(f"slots must be [B={b}, 1], got shape {slots.shape}")
    out_shape = (b, 1, h, groups, d)
    _check(out_shape, k_pool.reshape(k_pool.shape[-4:]),
           v_pool.reshape(v_pool.shape[-4:]), block_table, positions, sliding_window)
    pool = jax.ShapeDtypeStruct(k_pool.shape, jnp.float32)
    call = jax.ffi.ffi_call("jaxserve_paged_decode_attention_write",
                            (jax.ShapeDtypeStruct(out_shape, jnp.float32), pool, pool),
                            input_output_aliases={3: 1, 4: 2})
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    out, k_pool, v_pool = call(f32(qkv), f32(cos), f32(sin), k_pool, v_pool, block_table.astype(jnp.int32),
                               positions.astype(jnp.int32), slots.astype(jnp.int32),
                               sliding_window=np.int32(sliding_window))
    return out.astype(qkv.dtype), k_pool, v_pool


def paged_prefill_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    block_table: jax.Array,
    positions: jax.Array,
    sliding_window: int = 0,
) -> jax.Array:
    """Causal grouped-query attention of a chunk of T queries per row over the pages of its sequence.

    q: [B, T, Hkv, G, D]; k_pool, v_pool: [num_pages, Hkv, page_size, D] float32, already holding this chunk's
    keys and values; block_table: [B, n] page ids; positions: [B, T] absolute position of each query (-1 for a
    padding query, whose output is zeros). Key j is allowed for a query iff j <= its position and, with a sliding
    window, j > position - sliding_window; each query masks by its own position, so positions need not be
    contiguous (the kernel is fastest when they increase along T, as in a chunk). Returns [B, T, Hkv, G, D] in q's
    dtype.

    Queries are processed in tiles; a tile reads the keys from the smallest window start to the largest position
    of its queries, clamped to the n columns the table has. A page id outside [0, num_pages) in a column a tile
    reads fails the call (InvalidArgument from the kernel) rather than being clamped; other columns may hold
    anything.
    """
    if q.ndim != 5:
        raise ValueError(f"q must be [B, T, Hkv, G, D], got shape {q.shape}")
    return _call("jaxserve_paged_prefill_attention", q, k_pool, v_pool, block_table, positions, sliding_window)
