"""Matmuls against pre-packed weights for the CPU kernel (see cpu/matmul.cc for why packing).

A [K, N] weight is packed once, at load, into [N_padded / TILE, K, TILE] panels; `packed_matmul` then computes
x @ W for any number of rows. The logical N travels with the call so padding columns are dropped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

TILE = 48


def pack(w: jax.Array) -> jax.Array:
    """[K, N] -> [ceil(N / TILE), K, TILE], zero-padded past N."""
    k, n = w.shape
    panels = -(-n // TILE)
    w = jnp.pad(w, ((0, 0), (0, panels * TILE - n)))
    return w.reshape(k, panels, TILE).transpose(1, 0, 2)


def packed_matmul(x: jax.Array, packed: jax.Array, n: int, live: jax.Array | None = None) -> jax.Array:
    """x [..., K] float32 @ the packed weight -> [..., n] float32, on the CPU kernel.

    `live` (an int32 scalar), when given, says only the first `live` rows of x flattened over its leading dims are
    real: the rest are bucket padding, skipped by the kernel and returned as zeros.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    panels = packed.shape[0]
    live = jnp.full((), rows, jnp.int32) if live is None else jnp.asarray(live, jnp.int32).reshape(())
    call = jax.ffi.ffi_call("jaxserve_packed_matmul", jax.ShapeDtypeStruct((rows, panels * TILE), jnp.float32))
    y = call(x.reshape(rows, k).astype(jnp.float32), packed, live)
    return y[:, :n].reshape(*lead, n)
