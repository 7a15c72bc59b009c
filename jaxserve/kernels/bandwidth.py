"""The memory read-bandwidth probe on the CPU kernels (see cpu/bandwidth.cc for why a kernel): what a roofline
divides by."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def stream_read(x: jax.Array, streams: int) -> jax.Array:
    """Sum of float32 `x` (any shape) as a float32 scalar, each pool thread reading its share as `streams`
    interleaved runs."""
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    call = jax.ffi.ffi_call("jaxserve_stream_read", jax.ShapeDtypeStruct((1,), jnp.float32))
    return call(x.reshape(-1).astype(jnp.float32), streams=np.int32(streams))[0]
