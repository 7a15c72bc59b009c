"""Greedy and logprob statistics of a step's logits on the CPU kernel (see cpu/logit_stats.cc for why)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def logit_stats(logits: jax.Array, valid: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 logits [B, V] -> (max [B], first id of the max [B] int32, log(sum(exp(logits - max))) [B]) over
    the first `valid` ids of each row, as `sampling.sample` computes them with XLA's reductions."""
    b, v = logits.shape
    if not 1 <= valid <= v:
        raise ValueError(f"valid must be in [1, {v}], got {valid}")
    call = jax.ffi.ffi_call("jaxserve_logit_stats", (jax.ShapeDtypeStruct((b,), jnp.float32),
                                                     jax.ShapeDtypeStruct((b,), jnp.int32),
                                                     jax.ShapeDtypeStruct((b,), jnp.float32)))
    return call(logits.astype(jnp.float32), valid=np.int32(valid))
