"""The Llama family (Llama 2/3, Mistral, Qwen2) as Flax linen modules over a paged KV cache.

Each weight is declared once, in its module, with its shape, logical axes and initializer; the same declaration
gives the random init, the abstract tree for checkpoint restore and (through jaxserve.parallel.mesh) the shardings.
Modules are built with *local* sizes: under `shard_map` each tensor-parallel device holds `num_heads / tensor`
heads and `intermediate_size / tensor` MLP units, and the one all-reduce per block is an explicit `psum`.
Must not touch: scheduling, pages allocation, host state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxserve.config import ModelConfig
from jaxserve.kernels.attention import paged_decode_attention_write
from jaxserve.kernels.matmul import packed_matmul
from models.attention import paged_attention, write_kv

Params = dict[str, Any]

DTYPE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LocalShapes:
    """Per-device sizes under `tensor`-way tensor parallelism.

    With fewer KV heads than tensor devices, KV heads are replicated (each device keeps the one its query heads
    read), the vLLM convention: `kv_heads_total` is then `tensor`, not the checkpoint's count.
    """

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    kv_heads_total: int

    @staticmethod
    def of(cfg: ModelConfig, tensor: int) -> LocalShapes:
        """Splits `cfg`'s sizes over `tensor` devices."""
        kv_total = max(cfg.num_kv_heads, tensor)
        return LocalShapes(
            num_heads=cfg.num_heads // tensor,
            num_kv_heads=kv_total // tensor,
            intermediate_size=cfg.intermediate_size // tensor,
            vocab_size=cfg.vocab_size // tensor,
            kv_heads_total=kv_total,
        )


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim / 2], with linear or Llama 3 frequency-dependent scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        factor = cfg.rope_scaling_factor
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: Any, inv_freq: np.ndarray, xp: Any = jnp) -> tuple[Any, Any]:
    """cos and sin tables [B, T, head_dim] in float32 for absolute `positions` [B, T], computed with the array
    module `xp`: jax.numpy inside a traced function, numpy on the host (the runner does that, see `Runner._pack`)."""
    freqs = positions.astype(xp.float32)[..., None] * xp.asarray(inv_freq)  # [B, T, D/2]
    emb = xp.concatenate([freqs, freqs], axis=-1)
    return xp.cos(emb), xp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, H, D] by the half-split (Hugging Face) RoPE convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y.astype(self.dtype) * scale.astype(self.dtype)).astype(self.dtype)


class Projection(nn.Module):
    """A dense projection whose kernel has named logical axes (and an optional bias over the output axes).

    When the params hold `packed` (the kernel laid out for the CPU matmul kernel by `pack_projections`) instead of
    `kernel`, the product runs on that kernel: same math, the weights streamed at memory bandwidth.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, live: jax.Array | None = None, residual: jax.Array | None = None) -> jax.Array:
        """`live` (see `live_tokens`) lets the packed kernel skip padding rows; the XLA product ignores it.
        `residual` (shaped like the output) is added to it, inside the packed kernel's call when packed."""
        n_in = len(self.in_shape)
        if self.has_variable("params", "packed"):
            lead = x.shape[:x.ndim - n_in]
            n = math.prod(self.out_shape)
            y = packed_matmul(x.reshape(*lead, math.prod(self.in_shape)), self.get_variable("params", "packed"), n,
                              live, residual=None if residual is None else residual.reshape(*lead, n)
                              ).reshape(*lead, *self.out_shape)
            residual = None
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                       self.in_axes + self.out_axes),
                                self.in_shape + self.out_shape, self.param_dtype)
            y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                    (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())),
                                    preferred_element_type=jnp.float32)
        if self.use_bias:
            # Random rather than zero so that a fresh model exercises the bias path against the reference.
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.out_axes),
                              self.out_shape, self.param_dtype)
            y = y + bias.astype(jnp.float32)
        if residual is not None:
            y = y + residual.astype(jnp.float32)
        return y.astype(self.dtype)


@struct.dataclass
class StepInputs:
    """Per-token metadata of one step, shared by every layer.

    positions: [B, T] absolute positions (-1 for padding); slots: [B, T] KV slot of each token;
    block_table: [B, n] page ids of each row's sequence; cos, sin: [B, T, head_dim] RoPE tables.
    """

    positions: jax.Array
    slots: jax.Array
    block_table: jax.Array
    cos: jax.Array
    sin: jax.Array


@struct.dataclass
class FusedBlock:
    """Ops around a block that its packed CPU kernels do inside their calls. Why: each is an XLA op of ~10 us on
    [B, D] between kernel calls of ~100-400 us in a decode step.

    norm_scale: the block's RMSNorm scale, applied by the first projection's call to the block's raw input;
    residual: the block's input, added by its last projection's call (None: the caller adds it after the all-reduce).
    """

    norm_scale: jax.Array
    residual: jax.Array | None


def live_tokens(positions: jax.Array) -> jax.Array:
    """How many leading tokens of positions [B, T], flattened, reach the last real one (padding is -1).

    Decode batches and prefill chunks are padded at the end to their compiled bucket, so everything past this count
    is padding the CPU matmul kernel need not compute; padding inside it (rows of a multi-row prefill) is computed
    and ignored as before.
    """
    flat = positions.reshape(-1)
    return jnp.max(jnp.where(flat >= 0, jnp.arange(1, flat.shape[0] + 1, dtype=jnp.int32), 0))


class Attention(nn.Module):
    """Grouped-query self-attention over the paged KV cache (local heads of one tensor-parallel device)."""

    cfg: ModelConfig
    local: LocalShapes
    cpu_kernels: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array], step: StepInputs, live: jax.Array,
                 fused: FusedBlock | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """kv: this layer's pools [num_pages, Hkv, page_size, D], optionally with a leading axis of 1 (the runner's
        stage axis), returned in the same shape. `fused` (packed q/k/v only): x is the block's input before its
        norm, and the output includes the residual when `fused.residual` is set (see `FusedBlock`)."""
        cfg, loc = self.cfg, self.local
        dtype, pdtype = DTYPE[cfg.dtype], DTYPE[cfg.param_dtype]
        d, hd = cfg.hidden_size, cfg.head_dim

        def proj(name: str, heads: int, axis: str) -> jax.Array:
            return Projection((d,), (heads, hd), ("embed",), (axis, "head_dim"), cfg.attention_bias, dtype, pdtype,
                              name=name)(x, live)

        b, t = x.shape[:2]
        heads = (loc.num_heads, loc.num_kv_heads, loc.num_kv_heads)
        packed = self.has_variable("params", "qkv_proj")
        if packed:
            qkv = self._packed_qkv(x, live, fused)  # [B, T, Hq + 2 Hkv, D]
        else:
            q = proj("q_proj", loc.num_heads, "heads")  # [B, T, Hq, D]
            k = proj("k_proj", loc.num_kv_heads, "kv_heads")  # [B, T, Hkv, D]
            v = proj("v_proj", loc.num_kv_heads, "kv_heads")
        groups = loc.num_heads // loc.num_kv_heads
        if self.cpu_kernels and t == 1:  # RoPE and the pool writes inside the attention kernel's call
            out, k_pool, v_pool = paged_decode_attention_write(
                qkv if packed else jnp.concatenate([q, k, v], axis=2), step.cos, step.sin, kv[0], kv[1],
                step.block_table, step.positions, step.slots, cfg.sliding_window)
        else:
            if packed:
                q, k, v = jnp.split(qkv, np.cumsum(heads[:-1]), axis=2)
            lead = kv[0].shape[:-4]  # the runner's stage axis of 1, if the pools carry it
            q = apply_rope(q, step.cos, step.sin)
            k = apply_rope(k, step.cos, step.sin)
            k_pool = write_kv(kv[0].reshape(kv[0].shape[-4:]), k, step.slots)
            v_pool = write_kv(kv[1].reshape(kv[1].shape[-4:]), v, step.slots)
            out = paged_attention(q.reshape(b, t, loc.num_kv_heads, groups, hd), k_pool, v_pool, step.block_table,
                                  step.positions, cfg.sliding_window, self.cpu_kernels)
            k_pool, v_pool = k_pool.reshape(*lead, *k_pool.shape), v_pool.reshape(*lead, *v_pool.shape)
        out = out.reshape(b, t, loc.num_heads, hd)
        y = Projection((loc.num_heads, hd), (d,), ("heads", "head_dim"), ("embed",), False, dtype, pdtype,
                       name="o_proj")(out, live, None if fused is None else fused.residual)
        return y, (k_pool, v_pool)

    def _packed_qkv(self, x: jax.Array, live: jax.Array, fused: FusedBlock | None) -> jax.Array:
        """q, k and v heads side by side, [B, T, Hq + 2 Hkv, D], from the packed `qkv_proj` (see
        `pack_projections`) in one CPU matmul call, plus any biases."""
        loc, hd = self.local, self.cfg.head_dim
        heads = loc.num_heads + 2 * loc.num_kv_heads
        y = packed_matmul(x, self.get_variable("params", "qkv_proj")["packed"], heads * hd, live,
                          norm_scale=None if fused is None else fused.norm_scale, eps=self.cfg.rms_norm_eps)
        y = y.reshape(*x.shape[:-1], heads, hd)
        if self.cfg.attention_bias:
            y = y + jnp.concatenate([self.get_variable("params", name)["bias"]
                                     for name in ("q_proj", "k_proj", "v_proj")])
        return y


class MLP(nn.Module):
    """SwiGLU feed-forward over the local slice of hidden units."""

    cfg: ModelConfig
    local: LocalShapes

    @nn.compact
    def __call__(self, x: jax.Array, live: jax.Array | None = None, fused: FusedBlock | None = None
                 ) -> jax.Array:
        """`fused`: as for `Attention`, with the packed gate/up."""
        cfg = self.cfg
        dtype, pdtype = DTYPE[cfg.dtype], DTYPE[cfg.param_dtype]
        f = self.local.intermediate_size
        if self.has_variable("params", "gate_up_proj"):  # packed by `pack_projections`: SwiGLU in the kernel
            h = packed_matmul(x, self.get_variable("params", "gate_up_proj")["packed"], f, live, swiglu=True,
                              norm_scale=None if fused is None else fused.norm_scale, eps=cfg.rms_norm_eps)
            return Projection((f,), (cfg.hidden_size,), ("mlp",), ("embed",), False, dtype, pdtype,
                              name="down_proj")(h, live, None if fused is None else fused.residual)
        gate = Projection((cfg.hidden_size,), (f,), ("embed",), ("mlp",), False, dtype, pdtype,
                          name="gate_proj")(x, live)
        up = Projection((cfg.hidden_size,), (f,), ("embed",), ("mlp",), False, dtype, pdtype, name="up_proj")(x, live)
        h = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)
        return Projection((f,), (cfg.hidden_size,), ("mlp",), ("embed",), False, dtype, pdtype,
                          name="down_proj")(h, live)


class DecoderLayer(nn.Module):
    """Pre-norm attention block and MLP block; each ends in one all-reduce over the tensor axis."""

    cfg: ModelConfig
    local: LocalShapes
    tensor_axis: str | None
    # Decode attention on the CPU kernel (the projections follow their params: packed or not).
    cpu_kernels: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array], step: StepInputs
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        cfg = self.cfg
        dtype, pdtype = DTYPE[cfg.dtype], DTYPE[cfg.param_dtype]
        live = live_tokens(step.positions)
        with jax.named_scope("attention"):
            fused = self._fused("input_norm", "attn", "qkv_proj", x)
            h = x if fused is not None else RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_norm")(x)
            h, kv = Attention(cfg, self.local, self.cpu_kernels, name="attn")(h, kv, step, live, fused)
            x = h if fused is not None and fused.residual is not None else x + self._all_reduce(h)
        with jax.named_scope("mlp"):
            fused = self._fused("post_attention_norm", "mlp", "gate_up_proj", x)
            h = x if fused is not None else RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attention_norm")(x)
            h = MLP(cfg, self.local, name="mlp")(h, live, fused)
            x = h if fused is not None and fused.residual is not None else x + self._all_reduce(h)
        return x, kv

    def _fused(self, norm: str, block: str, packed: str, x: jax.Array) -> FusedBlock | None:
        """What the block's packed kernels take over when its first projection is packed (`pack_projections`):
        the norm, and the residual add unless an all-reduce must come between the product and the add."""
        params = self.variables.get("params", {})
        if packed not in params.get(block, {}):
            return None
        return FusedBlock(params[norm]["scale"], x if self.tensor_axis is None else None)

    def _all_reduce(self, partial: jax.Array) -> jax.Array:
        if self.tensor_axis is None:
            return partial
        return jax.lax.psum(partial.astype(jnp.float32), self.tensor_axis).astype(partial.dtype)


# Leading dims of each projection's kernel that it contracts with its input (after any stacked layer axes); the
# rest are output dims. o_proj reads [heads, head_dim].
PROJECTION_INPUT_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
                         "down_proj": 1}

# Projections of the same input that the CPU kernels compute in one matmul call, by the name of their packed weight:
# q, k and v side by side, and the MLP's gate and up interleaved with SwiGLU applied in the kernel. Why: a decode
# step is ~8 kernel calls per layer and each pays a start and a tail; one call also streams one contiguous weight.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def pack_projections(layer: Params, fn: Callable[[list[Any], int, bool], Any]) -> Params:
    """One layer's params laid out for the CPU kernels: the kernels of each projection, or of each group in
    `FUSED_PROJECTIONS`, replaced by `{"packed": fn(kernels, input dims, swiglu)}` (swiglu for gate_up_proj).

    Biases and norms stay where they were, so a fused projection with a bias keeps `{"bias": ...}` under its own
    name. Works on any tree shaped like a layer's params (arrays, logical axes).
    """
    def walk(tree: Params) -> Params:
        out: Params = {}
        for fused, members in FUSED_PROJECTIONS.items():
            if all(m in tree for m in members):
                out[fused] = {"packed": fn([tree[m]["kernel"] for m in members], PROJECTION_INPUT_DIMS[members[0]],
                                           fused == "gate_up_proj")}
        grouped = {m for f in out for m in FUSED_PROJECTIONS[f]}
        for name, sub in tree.items():
            if name in grouped:
                rest = {k: v for k, v in sub.items() if k != "kernel"}
                if rest:
                    out[name] = rest
            elif name in PROJECTION_INPUT_DIMS:
                out[name] = {("packed" if k == "kernel" else k): (fn([v], PROJECTION_INPUT_DIMS[name], False)
                                                                 if k == "kernel" else v) for k, v in sub.items()}
            elif isinstance(sub, dict):
                out[name] = walk(sub)
            else:
                out[name] = sub
        return out
    return walk(layer)


def declare_layer(cfg: ModelConfig, tensor: int = 1) -> DecoderLayer:
    """The decoder layer module with this device's local sizes."""
    return DecoderLayer(cfg, LocalShapes.of(cfg, tensor), None)


def _abstract_layer(cfg: ModelConfig) -> Params:
    """Boxed (LogicallyPartitioned) abstract params of one full-size layer."""
    layer = declare_layer(cfg)
    hd = cfg.head_dim
    x = jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), DTYPE[cfg.dtype])
    pool = jax.ShapeDtypeStruct((1, cfg.num_kv_heads, 16, hd), DTYPE[cfg.dtype])
    i32 = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    f = jax.ShapeDtypeStruct((1, 1, hd), jnp.float32)
    step = StepInputs(i32, i32, i32, f, f)
    return jax.eval_shape(lambda x, pool, step: layer.init(jax.random.key(0), x, (pool, pool), step),
                          x, pool, step)["params"]


def logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every canonical weight (layers stacked on a leading `layers` axis)."""
    layer_axes = jax.tree.map(lambda box: ("layers", *box.names), _abstract_layer(cfg),
                              is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    axes: Params = {
        "embed": {"embedding": ("vocab", "embed")},
        "layers": layer_axes,
        "final_norm": {"scale": ("embed",)},
    }
    if not cfg.tie_embeddings:
        axes["lm_head"] = {"kernel": ("embed", "vocab")}
    return axes


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the canonical (checkpoint) parameter tree, without allocating it."""
    pdtype = DTYPE[cfg.param_dtype]
    layer = jax.tree.map(lambda box: jax.ShapeDtypeStruct((cfg.num_layers, *box.value.shape), pdtype),
                         _abstract_layer(cfg), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    d, v = cfg.hidden_size, cfg.vocab_size
    tree: Params = {
        "embed": {"embedding": jax.ShapeDtypeStruct((v, d), pdtype)},
        "layers": layer,
        "final_norm": {"scale": jax.ShapeDtypeStruct((d,), pdtype)},
    }
    if not cfg.tie_embeddings:
        tree["lm_head"] = {"kernel": jax.ShapeDtypeStruct((d, v), pdtype)}
    return tree


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random canonical params (normal(0.02) kernels, unit norms), as the reference initializes them.

    Meant to run under `jax.jit` with output shardings, so no device ever holds the whole model.
    """
    pdtype = DTYPE[cfg.param_dtype]
    k_embed, k_head, k_layers = jax.random.split(key, 3)
    hd = cfg.head_dim
    layer = declare_layer(cfg)
    x = jnp.zeros((1, 1, cfg.hidden_size), DTYPE[cfg.dtype])
    pool = jnp.zeros((1, cfg.num_kv_heads, 16, hd), DTYPE[cfg.dtype])
    zeros = jnp.zeros((1, 1), jnp.int32)
    tab = jnp.zeros((1, 1, hd), jnp.float32)
    step = StepInputs(zeros, zeros, zeros, tab, tab)

    def one_layer(k: jax.Array) -> Params:
        return nn.unbox(layer.init(k, x, (pool, pool), step)["params"])

    layers = jax.vmap(one_layer)(jax.random.split(k_layers, cfg.num_layers))
    params: Params = {
        "embed": {"embedding": (0.02 * jax.random.normal(k_embed, (cfg.vocab_size, cfg.hidden_size))).astype(pdtype)},
        "layers": layers,
        "final_norm": {"scale": jnp.ones((cfg.hidden_size,), pdtype)},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {
            "kernel": (0.02 * jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size))).astype(pdtype)}
    return params


def embed_tokens(table: jax.Array, ids: jax.Array, dtype: Any, vocab_axis: str | None) -> jax.Array:
    """Looks up ids [B, T] in this device's vocabulary slice [V / tensor, D]; rows owned elsewhere are summed in."""
    if vocab_axis is None:
        return table[ids].astype(dtype)
    rows = table.shape[0]
    local = ids - jax.lax.axis_index(vocab_axis) * rows
    owned = (local >= 0) & (local < rows)
    x = jnp.where(owned[..., None], table[jnp.clip(local, 0, rows - 1)].astype(jnp.float32), 0.0)
    return jax.lax.psum(x, vocab_axis).astype(dtype)


def lm_logits(params: Params, cfg: ModelConfig, h: jax.Array, vocab_axis: str | None,
              live: jax.Array | None = None) -> jax.Array:
    """Final norm and LM head: hidden [..., D] -> float32 logits [..., V] gathered over the vocabulary shards.

    `live`: rows of h (flattened) past it are padding; the packed head leaves their logits zero.
    """
    dtype, pdtype = DTYPE[cfg.dtype], DTYPE[cfg.param_dtype]
    if "packed" in params.get("lm_head", {}):
        packed = params["lm_head"]["packed"]  # [runs, panels, D / runs, TILE] of this device's vocabulary slice
        logits = packed_matmul(h, packed, params["embed"]["embedding"].shape[0], live,  # this device's vocab
                               norm_scale=params["final_norm"]["scale"], eps=cfg.rms_norm_eps)
        if vocab_axis is None:
            return logits
        return jax.lax.all_gather(logits, vocab_axis, axis=logits.ndim - 1, tiled=True)
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype).apply({"params": params["final_norm"]}, h)
    if cfg.tie_embeddings:
        kernel = params["embed"]["embedding"].T  # [D, V / tensor]
    else:
        kernel = params["lm_head"]["kernel"]
    logits = jnp.einsum("...d,dv->...v", h, kernel.astype(dtype), preferred_element_type=jnp.float32)
    if vocab_axis is None:
        return logits
    return jax.lax.all_gather(logits, vocab_axis, axis=logits.ndim - 1, tiled=True)
