"""Microbatched pipeline parallelism over the `pipeline` mesh axis, run inside `shard_map`.

Each stage holds only its own contiguous block of layers (and their KV pages). A step's batch is split into M
microbatches (along rows, or along the tokens of a prefill chunk when there are fewer rows than microbatches: a
stage sees a sequence's sub-chunks in order, so causal attention over the pool stays exact). At tick t stage s
works on microbatch t - s and hands its activations to stage s + 1 with one `ppermute`, so all stages compute at
once; a step takes M + P - 1 ticks for M microbatches over P stages, and the bubble (idle) fraction per stage is
(P - 1) / (M + P - 1). Ticks in the bubble write their keys only to the trash slot, never to a live page.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from models.attention import TRASH_SLOT
from models.llama import StepInputs

KV = tuple[jax.Array, jax.Array]
# (layer index within the stage, hidden [b, t, D], kv of that layer, step metadata) -> (hidden, kv)
LayerFn = Callable[[int, jax.Array, KV, StepInputs], tuple[jax.Array, KV]]


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Fraction of ticks each stage idles in one pipelined step."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


Split = Callable[[jax.Array], jax.Array]


def microbatching(rows: int, length: int, micro: int) -> tuple[Split, Split, Split]:
    """(split, split_table, merge) between a step's arrays and M microbatches.

    `split` maps [B, T, ...] to [M, b, t, ...], `split_table` maps a [B, n] block table to [M, b, n], and `merge`
    inverts `split`. Rows are split when they divide evenly; otherwise a prefill chunk is cut into sub-chunks along
    T (each holding every row, so each repeats the whole block table); failing both, the step is one microbatch.
    """
    if micro > 1 and rows % micro == 0:
        def split(a: jax.Array) -> jax.Array:
            return a.reshape(micro, rows // micro, *a.shape[1:])

        def merge(a: jax.Array) -> jax.Array:
            return a.reshape(rows, *a.shape[2:])

        return split, split, merge
    micro = micro if micro > 1 and length % micro == 0 else 1

    def split_time(a: jax.Array) -> jax.Array:
        return a.reshape(rows, micro, length // micro, *a.shape[2:]).swapaxes(0, 1)

    def repeat_table(a: jax.Array) -> jax.Array:
        return jnp.broadcast_to(a, (micro, *a.shape))

    def merge_time(a: jax.Array) -> jax.Array:
        return a.swapaxes(0, 1).reshape(rows, length, *a.shape[3:])

    return split_time, repeat_table, merge_time


def run_stages(
    layer_fn: LayerFn,
    kv: list[KV],
    x: jax.Array,
    steps: StepInputs,
    num_stages: int,
    stage_axis: str | None,
) -> tuple[jax.Array, list[KV]]:
    """Runs this stage's layers over M microbatches and returns the last stage's output on every stage.

    x: [M, b, t, D] embedded microbatches; steps: StepInputs whose arrays lead with [M, b]; kv: this stage's
    pools, one (k, v) per local layer. Returns hidden [M, b, t, D] after the last layer, and the updated pools.
    """
    num_micro = x.shape[0]
    kv = list(kv)

    def stage_layers(h: jax.Array, step: StepInputs) -> jax.Array:
        for j in range(len(kv)):
            h, kv[j] = layer_fn(j, h, kv[j], step)
        return h

    if num_stages == 1:
        outs = [stage_layers(x[m], jax.tree.map(lambda a, m=m: a[m], steps)) for m in range(num_micro)]
        return jnp.stack(outs), kv

    stage = jax.lax.axis_index(stage_axis)
    is_first, is_last = stage == 0, stage == num_stages - 1
    ring = [(i, (i + 1) % num_stages) for i in range(num_stages)]
    carry = jnp.zeros_like(x[0])
    outs = jnp.zeros_like(x)
    for tick in range(num_micro + num_stages - 1):
        micro = tick - stage
        active = (micro >= 0) & (micro < num_micro)
        index = jnp.clip(micro, 0, num_micro - 1)
        step = jax.tree.map(lambda a, i=index: a[i], steps)
        step = step.replace(slots=jnp.where(active, step.slots, TRASH_SLOT))
        h = jnp.where(is_first, x[min(tick, num_micro - 1)], carry)
        h = stage_layers(h, step)
        outs = jnp.where(is_last & active, outs.at[index].set(h), outs)
        carry = jax.lax.ppermute(h, stage_axis, ring)
    # Only the last stage holds real outputs; summing zeros from the others broadcasts them to every stage.
    outs = jax.lax.psum(jnp.where(is_last, outs, jnp.zeros_like(outs)), stage_axis)
    return outs, kv
