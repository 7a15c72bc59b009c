"""Matmuls against pre-packed weights for the CPU kernel (see cpu/matmul.cc for why packing).

A [K, N] weight is packed once, at load, into [streams(), N_padded / tile(), ceil(K / streams()), tile()]: panels of
tile() columns, each split along K into streams() runs, run s of every panel in region s, so that a thread doing a
range of panels reads streams() long contiguous runs (both numbers are the host build's, see `build.matmul_tile`
and `build.matmul_streams`); `packed_matmul` then computes x @ W for any number of rows. The logical N travels with
the call so padding columns are never written. An MLP's gate and up weights can be packed together
(`pack_swiglu`) so that one call computes silu(x @ gate) * (x @ up).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.kernels import build


def tile() -> int:
    """Columns per packed panel on this host."""
    return build.matmul_tile()


def streams() -> int:
    """Runs each packed panel's K rows are split into on this host."""
    return build.matmul_streams()


def pack(w: jax.Array) -> jax.Array:
    """[K, N] -> [streams(), ceil(N / tile()), ceil(K / streams()), tile()]: W[k, c] at
    [k // kq, c // tile(), k % kq, c % tile()] (kq the run length), zero-padded past K and N."""
    k, n = w.shape
    width, runs = tile(), streams()
    panels, kq = -(-n // width), -(-k // runs)
    w = jnp.pad(w, ((0, runs * kq - k), (0, panels * width - n)))
    return w.reshape(runs, kq, panels, width).transpose(0, 2, 1, 3)


def pack_swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """[K, N] gate and up -> [streams(), 2 * ceil(N / tile()), ceil(K / streams()), tile()]: their panels
    interleaved, gate first, for `packed_matmul(..., swiglu=True)`. Each pair of panels is contiguous in every
    region, so the kernel streams them as one."""
    g, u = pack(gate), pack(up)
    return jnp.stack([g, u], axis=2).reshape(g.shape[0], 2 * g.shape[1], *g.shape[2:])


def packed_matmul(x: jax.Array, packed: jax.Array, n: int, live: jax.Array | None = None,
                  swiglu: bool = False, norm_scale: jax.Array | None = None, eps: float = 0.0,
                  residual: jax.Array | None = None) -> jax.Array:
    """x [..., K] float32 @ the packed weight -> [..., n] float32, on the CPU kernel.

    `live` (an int32 scalar), when given, says only the first `live` rows of x flattened over its leading dims are
    real: the rest are bucket padding, skipped by the kernel and returned as zeros (as their `residual` rows when
    one is given). `swiglu`: `packed` comes from `pack_swiglu` and the result is silu(x @ gate) * (x @ up).
    `norm_scale` [K]: x is first RMS-normalized (x * rsqrt(mean(x**2) + eps) * norm_scale, in float32).
    `residual` [..., n]: added to the product. Both fold into the call what would otherwise be XLA ops of their own
    between two kernel calls.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    runs, panels, kq, width = packed.shape
    panels //= 2 if swiglu else 1
    if width != tile() or runs != streams():
        raise ValueError(f"packed_matmul: {runs} runs of panels of {width} columns, but this host's kernels take "
                         f"{streams()} of {tile()}")
    if kq != -(-k // runs):
        raise ValueError(f"packed_matmul: runs of {kq} rows do not split K={k} into {runs}")
    if not (panels - 1) * width < n <= panels * width:
        raise ValueError(f"packed_matmul: n={n} does not fit {panels} panels of {width} columns")
    if norm_scale is not None and norm_scale.shape != (k,):
        raise ValueError(f"packed_matmul: norm_scale has shape {norm_scale.shape}, expected ({k},)")
    if residual is not None and residual.shape != (*lead, n):
        raise ValueError(f"packed_matmul: residual has shape {residual.shape}, expected {(*lead, n)}")
    live = jnp.full((), rows, jnp.int32) if live is None else jnp.asarray(live, jnp.int32).reshape(())
    absent = jnp.zeros((0,), jnp.float32)
    scale = absent if norm_scale is None else norm_scale.astype(jnp.float32)
    res = absent if residual is None else residual.reshape(rows, n).astype(jnp.float32)
    call = jax.ffi.ffi_call("jaxserve_packed_matmul", jax.ShapeDtypeStruct((rows, n), jnp.float32))
    y = call(x.reshape(rows, k).astype(jnp.float32), packed, live, scale, res, swiglu=swiglu,
             eps=np.float32(eps))
    return y.reshape(*lead, n)
