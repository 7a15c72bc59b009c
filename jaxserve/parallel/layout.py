"""Canonical (checkpoint) parameter layout <-> serving layout on a mesh, and the shardings of both.

Canonical: layers stacked on one leading axis [L, ...], KV heads as in the checkpoint; independent of the mesh,
so one checkpoint serves every mesh. Serving: a list over the L / P layers of a stage, each leaf [P, ...] holding
layer `stage * L / P + j` at index `stage`, and KV heads repeated up to `tensor` when the checkpoint has fewer. The
leading per-stage axis is what `shard_map` splits over `pipeline`; indexing it away inside a stage is free, where
slicing a stacked [L / P, ...] block per layer would copy every weight on every step.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import Config
from jaxserve.kernels import matmul
from jaxserve.parallel.mesh import logical_to_spec, mesh_axis
from models import llama

Params = dict[str, Any]


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str | None) for a in x)


def canonical_specs(config: Config) -> Params:
    """PartitionSpecs of the canonical tree (layers split over `pipeline` in contiguous blocks)."""
    axes = llama.logical_axes(config.model)
    if config.model.num_kv_heads < config.mesh.tensor:
        # Fewer KV heads than tensor devices: the checkpoint's KV heads stay replicated until they are repeated.
        axes = jax.tree.map(lambda a: tuple(None if n == "kv_heads" else n for n in a), axes, is_leaf=_is_axes)
    return jax.tree.map(logical_to_spec, axes, is_leaf=_is_axes)


def _packed_axes(kernels: list[tuple[str | None, ...]], n_in: int, swiglu: bool) -> tuple[str | None, ...]:
    """Logical axes of a packed kernel: [layers, *in, *out] -> [layers, runs, panels, K / runs, TILE]. Each device
    packs its own slice, so a sharded output axis becomes a split of the panels and a sharded input axis a split of
    each run of K; kernels packed together (`llama.FUSED_PROJECTIONS`) are sharded alike, so the first one's axes
    stand for all."""
    del swiglu
    axes = kernels[0]

    def sharded(names: tuple[str | None, ...]) -> str | None:
        return next((a for a in names if a is not None and mesh_axis(a) is not None), None)
    return (axes[0], None, sharded(axes[1 + n_in:]), sharded(axes[1:1 + n_in]), None)


def serving_specs(config: Config, packed: bool = False) -> Params:
    """PartitionSpecs of the serving tree: the canonical ones with `layers` standing for the per-stage axis.

    `packed`: the tree `pack_for_cpu_kernels` returns, projections packed and a packed LM head added.
    """
    axes = llama.logical_axes(config.model)
    layer_axes = axes.pop("layers")
    if packed:
        layer_axes = llama.pack_projections(layer_axes, _packed_axes)
        axes["lm_head"] = {"packed": (None, "vocab", None, None)}
    specs = jax.tree.map(logical_to_spec, axes, is_leaf=_is_axes)
    specs["layers"] = [jax.tree.map(logical_to_spec, layer_axes, is_leaf=_is_axes)] * (
        config.model.num_layers // config.mesh.pipeline)
    return specs


def pack_for_cpu_kernels(params: Params, config: Config, mesh: Mesh) -> Params:
    """The serving tree with every projection kernel, and the LM head, packed for the CPU matmul kernel.

    Each device packs its own shard (under shard_map), so packing never gathers a weight. Projection kernels are
    replaced (q/k/v and gate/up packed together, see `llama.pack_projections`); the embedding table stays for the
    lookup (tied embeddings then hold the head twice, once packed).
    """
    def pack_local(kernels: list[jax.Array], n_in: int, swiglu: bool) -> jax.Array:  # each [1 stage, *in, *out]
        k = math.prod(kernels[0].shape[1:1 + n_in])
        flat = [a.reshape(k, -1) for a in kernels]
        return (matmul.pack_swiglu(*flat) if swiglu else matmul.pack(jnp.concatenate(flat, axis=1)))[None]

    def body(p: Params) -> Params:
        out = dict(p)
        out["layers"] = [llama.pack_projections(layer, pack_local) for layer in p["layers"]]
        head = p["embed"]["embedding"].T if config.model.tie_embeddings else p["lm_head"]["kernel"]
        out["lm_head"] = {"packed": matmul.pack(head)}
        return out

    out_specs = serving_specs(config, packed=True)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(serving_specs(config),), out_specs=out_specs, check_vma=False)
    return jax.jit(fn, out_shardings=shardings(mesh, out_specs))(params)


def shardings(mesh: Mesh, specs: Params) -> Params:
    """NamedShardings on `mesh` for a tree of PartitionSpecs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _repeat_kv_heads(layers: Params, repeats: int) -> Params:
    """Repeats each KV head `repeats` times (k/v kernels [L, D, Hkv, hd], biases [L, Hkv, hd])."""
    attn = dict(layers["attn"])
    for name in ("k_proj", "v_proj"):
        proj = dict(attn[name])
        proj["kernel"] = jnp.repeat(proj["kernel"], repeats, axis=2)
        if "bias" in proj:
            proj["bias"] = jnp.repeat(proj["bias"], repeats, axis=1)
        attn[name] = proj
    return {**layers, "attn": attn}


def to_serving(canonical: Params, config: Config) -> Params:
    """Canonical tree -> serving tree (pure; jit it with serving shardings so each stage keeps its own layers)."""
    cfg, p = config.model, config.mesh.pipeline
    layers = canonical["layers"]
    if cfg.num_kv_heads < config.mesh.tensor:
        layers = _repeat_kv_heads(layers, config.mesh.tensor // cfg.num_kv_heads)
    per_stage = cfg.num_layers // p
    blocks = jax.tree.map(lambda a: a.reshape(p, per_stage, *a.shape[1:]), layers)
    serving = {k: v for k, v in canonical.items() if k != "layers"}
    serving["layers"] = [jax.tree.map(lambda a, j=j: a[:, j], blocks) for j in range(per_stage)]
    return serving


@functools.cache
def _compiled_layouts(config: Config, mesh: Mesh) -> tuple[Any, Any]:
    """Jitted (init, to_serving) for one config and mesh, built once so repeated loads do not recompile."""
    canon = shardings(mesh, canonical_specs(config))
    out = shardings(mesh, serving_specs(config))
    init = jax.jit(lambda k: llama.init_params(config.model, k), out_shardings=canon)
    place = jax.jit(lambda c: to_serving(c, config), out_shardings=out)
    return init, place


def place_serving(canonical: Params, config: Config, mesh: Mesh) -> Params:
    """Lays a canonical tree (host or sharded arrays) out for serving on `mesh`, one device slice at a time."""
    return _compiled_layouts(config, mesh)[1](canonical)


def random_serving_params(config: Config, mesh: Mesh) -> Params:
    """Seeded random weights created directly in their serving shardings (no device ever holds the whole model)."""
    init, place = _compiled_layouts(config, mesh)
    return place(init(jax.random.key(config.checkpoint.seed)))
