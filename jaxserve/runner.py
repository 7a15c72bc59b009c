"""Owns the sharded params and the device KV pool; compiles and runs the prefill and decode steps and the copies of
whole pages between the pool and host memory.

Shapes are bucketed (rows, chunk length, pages per sequence; pages per copy) and each bucket is compiled once, ahead
of time at start when `runner.warmup` is set; `compile_count` counts every compilation so callers can check it stays
flat. The KV pool is donated to every step and copy and updated in place. Mechanism only: which rows run and which
pages move is the scheduler's and the KV cache's choice.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import Config
from jaxserve.kernels import build as kernels
from jaxserve.kernels.logit_stats import logit_stats
from jaxserve.parallel import layout
from jaxserve.parallel.mesh import logical_to_spec, make_mesh, mesh_axis
from jaxserve.parallel.pipeline import microbatching, run_stages
from jaxserve.sampling import Sampled, SamplingParams, sample
from models import llama
from models.attention import TRASH_SLOT

Params = dict[str, Any]
KVPool = list[tuple[jax.Array, jax.Array]]
KV_AXES = ("layers", "kv_pages", "kv_heads", None, "head_dim")
# Pages copied out of or into the pool: [pages, layers per stage, k/v, stages, kv heads, page_size, head_dim].
PAGE_BATCH_AXES = (None, None, None, "layers", "kv_heads", None, "head_dim")


@dataclasses.dataclass
class StepBatch:
    """Host-side inputs of one step, unpadded: B rows of T tokens (decode: T = 1).

    tokens, positions, slots: [B, T] (positions -1 and slots TRASH_SLOT on padding); block_table: [B, n] page ids;
    last_index: [B] index in T of the token whose next token is sampled; sampling knobs: [B] each; logprobs: [B]
    top alternatives wanted per row (None: none).
    """

    tokens: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    block_table: np.ndarray
    last_index: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    logprobs: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        """Rows in the batch before padding."""
        return self.tokens.shape[0]


@dataclasses.dataclass(frozen=True)
class Feed:
    """Decode input tokens taken on the device from the previous step's outputs instead of from the host.

    `tokens`: the sampled ids of the previous step's decode call (`Sampled.token`, its rows bucket; None if it had
    none); `prefill`: those of its prefill calls ([1] each, at most `runner.max_batch`); `rows` [B]: for each row of
    this batch where its input token is, as an index into `tokens` followed by `prefill`, or -1 to take
    `StepBatch.tokens`. Why: the next step can be dispatched before the previous one's ids reach the host, so the
    host's work overlaps the device's (asynchronous scheduling).
    """

    tokens: jax.Array | None
    rows: np.ndarray
    prefill: tuple[jax.Array, ...] = ()


def _bucket(value: int, buckets: tuple[int, ...], what: str) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{what} {value} exceeds the largest bucket {buckets[-1]}")


# The per-row scalars of a step's int32 input, after its [length] and [pages] blocks, in this order.
_INT_SCALARS = ("last_index", "top_k", "seed", "logprobs", "feed")


def _int_columns(length: int, pages: int) -> int:
    """Columns of a step's int32 input [rows, ...]: tokens, positions and slots [length] each, the block table
    [pages], then `_INT_SCALARS` (the seed as its bits; the feed source -1 where there is none)."""
    return 3 * length + pages + len(_INT_SCALARS)


def _int_column(length: int, pages: int, scalar: str) -> int:
    """The column of one of `_INT_SCALARS` in a step's int32 input."""
    return 3 * length + pages + _INT_SCALARS.index(scalar)


def _float_columns(length: int, head_dim: int) -> int:
    """Columns of a step's float32 input [rows, ...]: temperature, top_p, then RoPE cos and sin [length, head_dim]
    each."""
    return 2 + 2 * length * head_dim


def _unpack(ints: jax.Array, floats: jax.Array, length: int, head_dim: int) -> tuple[Any, ...]:
    """A step's two inputs (see `Runner._pack`) -> tokens, positions, slots, block_table, last_index, sampling
    params, feed source, cos, sin."""
    rows = ints.shape[0]
    pages = ints.shape[1] - _int_columns(length, 0)
    col = {name: ints[:, _int_column(length, pages, name)] for name in _INT_SCALARS}
    tokens, positions, slots = (ints[:, i * length: (i + 1) * length] for i in range(3))
    sampling = SamplingParams(floats[:, 0], col["top_k"], floats[:, 1],
                              jax.lax.bitcast_convert_type(col["seed"], jnp.uint32), col["logprobs"])
    rope = length * head_dim
    cos = floats[:, 2: 2 + rope].reshape(rows, length, head_dim)
    sin = floats[:, 2 + rope:].reshape(rows, length, head_dim)
    block_table = ints[:, 3 * length: 3 * length + pages]
    return tokens, positions, slots, block_table, col["last_index"], sampling, col["feed"], cos, sin


def page_buckets(max_pages: int) -> tuple[int, ...]:
    """Pages-per-sequence buckets: powers of two below the block-table width, then the width itself."""
    out = [1 << i for i in range(max(1, math.ceil(math.log2(max_pages))) + 1) if (1 << i) < max_pages]
    return tuple(out + [max_pages])


class _PageBatch:
    """Pages gathered from the pool by one copy. Their transfer to host memory starts at once; the first reader
    waits for it and frees the device buffer, and the host copy lives while some page still needs it."""

    def __init__(self, array: jax.Array) -> None:
        array.copy_to_host_async()
        self._array: jax.Array | None = array
        self._host: np.ndarray | None = None
        self.lock = threading.Lock()

    def is_ready(self) -> bool:
        """Whether the copy has landed (reading it then costs no wait)."""
        return self._array is None or self._array.is_ready()

    def host(self) -> np.ndarray:
        """[pages, ...] in host memory; call with `lock` held."""
        if self._host is None:
            self._host = np.asarray(self._array)
            self._array = None
        return self._host


class PagePayload:
    """One page of a `_PageBatch`: [layers per stage, k/v, stages, kv heads, page_size, head_dim]. Once read, the
    page owns a copy of its bytes, so a tier holding it holds exactly one page of memory."""

    def __init__(self, batch: _PageBatch, index: int) -> None:
        self._batch: _PageBatch | None = batch
        self._index = index
        self._page: np.ndarray | None = None

    def is_ready(self) -> bool:
        """Whether `numpy()` would return without waiting for the device."""
        batch = self._batch
        return batch is None or batch.is_ready()

    def numpy(self) -> np.ndarray:
        """The page's KV in host memory (waits for the copy). Safe from any thread."""
        batch = self._batch
        if batch is not None:
            with batch.lock:
                if self._page is None:
                    self._page = batch.host()[self._index].copy()
                    self._batch = None
        return self._page  # type: ignore[return-value]


def use_cpu_kernels(config: Config, mesh: Mesh) -> bool:
    """Whether steps run on the hand-written CPU kernels (`runner.cpu_kernels`; see jaxserve/kernels).

    "auto" takes them where they apply and build, "on" raises ValueError saying why they cannot be used.
    """
    mode = config.runner.cpu_kernels
    if mode == "off":
        return False
    why = []
    platform = mesh.devices.flat[0].platform
    if platform != "cpu":
        why.append(f"the backend is {platform}, not cpu")
    dtypes = {config.model.dtype, config.model.param_dtype, config.cache.dtype}
    if dtypes != {"float32"}:
        why.append(f"they are float32 only and the model or KV cache uses {sorted(dtypes - {'float32'})}")
    if not why and not kernels.available():
        why.append(kernels.unavailable_reason())
    if why and mode == "on":
        raise ValueError(f"runner.cpu_kernels=on but the CPU kernels cannot be used: {'; '.join(why)}")
    if why:
        logging.info("CPU kernels not used: %s", "; ".join(why))
    return not why


class Runner:
    """Compiled prefill/decode over a paged KV pool on a (data, pipeline, tensor) mesh."""

    def __init__(self, config: Config, params: Params | None = None, mesh: Mesh | None = None) -> None:
        self.config = config
        # Padding rows of the vocabulary (model.sampled_vocab_size) are masked so they can never be sampled.
        self.sampled_vocab = config.model.sampled_vocab_size or config.model.vocab_size
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh)
        params = params if params is not None else layout.random_serving_params(config, self.mesh)
        self.cpu_kernels = use_cpu_kernels(config, self.mesh)
        if self.cpu_kernels:
            params = layout.pack_for_cpu_kernels(params, config, self.mesh)
        self.params = params
        self.param_specs = layout.serving_specs(config, packed=self.cpu_kernels)
        self.local = llama.LocalShapes.of(config.model, config.mesh.tensor)
        self._inv_freq = llama.rope_inv_freq(config.model)  # RoPE frequencies, for the host-side tables
        self.kv = self._new_pool()
        self.page_buckets = page_buckets(config.max_pages_per_seq)
        # A step writes at least two KV rows: XLA copies the whole pool around a one-row update (see write_kv).
        self.decode_buckets = tuple(sorted({max(2, b) for b in config.runner.batch_buckets}))
        self.prefill_buckets = tuple(sorted({max(2, t) for t in config.runner.prefill_buckets}))
        # Pages per copy, from 2 (same reason) to one sequence's block table; larger copies are split.
        self.copy_buckets = tuple(1 << i for i in range(1, max(1, math.ceil(math.log2(config.max_pages_per_seq))) + 1))
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self._no_ids_cache: dict[int, jax.Array] = {}
        self._lock = threading.Lock()
        self.compile_count = 0

    # ----- setup -----

    def _new_pool(self) -> KVPool:
        cfg, cache = self.config.model, self.config.cache
        shape = (self.config.mesh.pipeline, cache.num_pages, self.local.kv_heads_total, cache.page_size,
                 cfg.head_dim)
        sharding = NamedSharding(self.mesh, logical_to_spec(KV_AXES))
        zeros = jax.jit(lambda: jnp.zeros(shape, llama.DTYPE[cache.dtype]), out_shardings=sharding)
        return [(zeros(), zeros()) for _ in range(cfg.num_layers // self.config.mesh.pipeline)]

    def reset_cache(self) -> None:
        """Zeroes the KV pool (tests and benchmarks start from a clean cache)."""
        self.kv = self._new_pool()

    def recover(self) -> bool:
        """After a failed step: rebuilds the KV pool if the failure consumed its donated buffers.

        Returns True when the pool was rebuilt, i.e. every sequence's cached KV is gone and must be recomputed.
        """
        if not any(k.is_deleted() or v.is_deleted() for k, v in self.kv):
            return False
        logging.warning("a failed step consumed the KV pool; rebuilding it")
        self.kv = self._new_pool()
        return True

    @property
    def page_shape(self) -> tuple[int, ...]:
        """One page's KV as copied out: [layers per stage, k/v, stages, kv heads, page_size, head_dim]."""
        k = self.kv[0][0]
        return (len(self.kv), 2, k.shape[0], *k.shape[2:])

    @property
    def page_dtype(self) -> np.dtype:
        """The pool's element type, as numpy knows it."""
        return np.dtype(self.kv[0][0].dtype)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers, keys and values."""
        return math.prod(self.page_shape) * self.page_dtype.itemsize

    def cache_salt(self) -> bytes:
        """What a cached page's bytes depend on besides its tokens: model, weights, layout, dtype, page size, and
        the configured salt. Cached pages (on disk, across restarts too) are only reused under an equal salt."""
        cfg = self.config
        first_rows = np.asarray(self.params["embed"]["embedding"][:2])  # tells apart weights under one config
        h = hashlib.blake2b(digest_size=16)
        for part in (repr(cfg.model), repr(self.page_shape), str(self.page_dtype), cfg.checkpoint.path,
                     str(cfg.checkpoint.seed), cfg.cache.salt):
            h.update(part.encode() + b"\0")
        h.update(first_rows.tobytes())
        return h.digest()

    # ----- the step function (pure) -----

    def _forward_local(self, params: Params, kv: KVPool, tokens: jax.Array, positions: jax.Array,
                       slots: jax.Array, block_table: jax.Array, cos: jax.Array, sin: jax.Array
                       ) -> tuple[jax.Array, KVPool]:
        """Per-device body under shard_map: embed, pipelined layers, return hidden [B, T, D] and the pools."""
        cfg, mesh_cfg = self.config.model, self.config.mesh
        tensor_axis = mesh_axis("heads") if mesh_cfg.tensor > 1 else None
        vocab_axis = mesh_axis("vocab") if mesh_cfg.tensor > 1 else None
        stage_axis = mesh_axis("layers") if mesh_cfg.pipeline > 1 else None
        layers = [jax.tree.map(lambda a: a[0], layer) for layer in params["layers"]]  # drop the stage axis
        x = llama.embed_tokens(params["embed"]["embedding"], tokens, llama.DTYPE[cfg.dtype], vocab_axis)

        micro = mesh_cfg.num_microbatches if mesh_cfg.pipeline > 1 else 1
        split, split_table, merge = microbatching(tokens.shape[0], tokens.shape[1], micro)
        steps = llama.StepInputs(split(positions), split(slots), split_table(block_table), split(cos), split(sin))

        layer = llama.DecoderLayer(cfg, self.local, tensor_axis, self.cpu_kernels)

        def layer_fn(j: int, h: jax.Array, kv_j: tuple[jax.Array, jax.Array], s: llama.StepInputs):
            return layer.apply({"params": layers[j]}, h, kv_j, s)

        hidden, kv = run_stages(layer_fn, kv, split(x), steps, mesh_cfg.pipeline, stage_axis)
        return merge(hidden), kv

    def _step(self, params: Params, kv: KVPool, ints: jax.Array, floats: jax.Array, fed: jax.Array, length: int,
              all_logits: bool) -> tuple[Sampled | jax.Array, KVPool]:
        cfg = self.config.model
        vocab_axis = mesh_axis("vocab") if self.config.mesh.tensor > 1 else None
        param_specs = self.param_specs
        kv_spec = logical_to_spec(KV_AXES)
        kv_specs = [(kv_spec, kv_spec)] * len(kv)
        tokens, positions, slots, block_table, last_index, sampling, src, cos, sin = _unpack(
            ints, floats, length, cfg.head_dim)
        rows = jnp.arange(tokens.shape[0])
        if length == 1:  # a decode step: rows with a feed source take their token from `fed`
            picked = fed[jnp.clip(src, 0, fed.shape[0] - 1)]
            tokens = jnp.where(src >= 0, picked, tokens[:, 0])[:, None]

        def body(params, kv, tokens, positions, slots, block_table, cos, sin, last_index):
            hidden, kv = self._forward_local(params, kv, tokens, positions, slots, block_table, cos, sin)
            live = None
            if not all_logits:
                rows = jnp.arange(hidden.shape[0])
                hidden = hidden[rows, last_index]  # [B, D]
                live = llama.live_tokens(positions[rows, last_index])
            return llama.lm_logits(params, cfg, hidden, vocab_axis, live), kv

        rep = PartitionSpec()
        logits, kv = jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(param_specs, kv_specs, rep, rep, rep, rep, rep, rep, rep),
            out_specs=(rep, kv_specs), check_vma=False,
        )(params, kv, tokens, positions, slots, block_table, cos, sin, last_index)
        if all_logits:
            return logits, kv
        next_pos = positions[rows, last_index] + 1
        return sample(logits, sampling, next_pos, self.config.runner.max_logprobs, self.sampled_vocab,
                      logit_stats if self.cpu_kernels else None), kv

    def hlo_texts(self) -> list[str]:
        """The optimised HLO of every executable compiled so far. Why: a profile names the XLA ops it timed
        (`ffi_call.67`); this text says which layer part each one is (see jaxserve.bench.profile)."""
        return [exe.as_text() for exe in self._compiled.values()]

    # ----- compilation -----

    def _executable(self, rows: int, length: int, pages: int, all_logits: bool) -> Any:
        key = (rows, length, pages, all_logits)
        exe = self._compiled.get(key)
        if exe is not None:
            return exe
        fn = jax.jit(functools.partial(self._step, length=length, all_logits=all_logits), donate_argnums=(1,))
        logging.info("compiling step rows=%d length=%d pages=%d all_logits=%s", rows, length, pages, all_logits)
        ints = jax.ShapeDtypeStruct((rows, _int_columns(length, pages)), jnp.int32)
        floats = jax.ShapeDtypeStruct((rows, _float_columns(length, self.config.model.head_dim)), jnp.float32)
        exe = fn.lower(self.params, self.kv, ints, floats, jax.ShapeDtypeStruct((rows,), jnp.int32)).compile()
        self._compiled[key] = exe
        self.compile_count += 1
        return exe

    def _feed_executable(self, previous: int, rows: int) -> Any:
        """The gather of a `Feed` the step cannot take as it is: ids [previous] of a decode call and
        runner.max_batch prefill ids [1], source indices [rows] into their concatenation -> ids [rows] (0 where the
        source is -1)."""
        key = ("feed", previous, rows)
        exe = self._compiled.get(key)
        if exe is not None:
            return exe

        def gather(ids: jax.Array, prefill: list[jax.Array], src: jax.Array) -> jax.Array:
            every = jnp.concatenate([ids, *prefill])
            return jnp.where(src >= 0, every[jnp.clip(src, 0, every.shape[0] - 1)], 0)

        rep = NamedSharding(self.mesh, PartitionSpec())
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=rep)  # noqa: E731
        exe = jax.jit(gather, out_shardings=rep).lower(
            i32(previous), [i32(1)] * self.config.runner.max_batch, i32(rows)).compile()
        self._compiled[key] = exe
        self.compile_count += 1
        return exe

    def warmup(self) -> None:
        """Compiles every decode bucket (rows x pages) and every prefill bucket (chunk x pages) ahead of use, the
        token feeds between decode buckets, and the page copies when pages can leave the device."""
        for pages in self.page_buckets:
            for rows in self.decode_buckets:
                self._executable(rows, 1, pages, False)
            for length in self.prefill_buckets:
                self._executable(1, length, pages, False)
        for previous in self.decode_buckets:
            for rows in self.decode_buckets:
                self._feed_executable(previous, rows)
        if self.config.cache.has_host_tier:
            for num in self.copy_buckets:
                self._copy_executable("read", num)
                self._copy_executable("write", num)

    # ----- page copies -----

    def _read_fn(self, kv: KVPool, pages: jax.Array) -> jax.Array:
        out = jnp.stack([jnp.stack([k[:, pages], v[:, pages]]) for k, v in kv])  # [Ls, 2, P, n, H, ps, D]
        return jnp.moveaxis(out, 3, 0)  # [n, Ls, 2, P, H, ps, D]

    def _write_fn(self, kv: KVPool, pages: jax.Array, data: jax.Array) -> KVPool:
        data = jnp.moveaxis(data, 0, 3)  # [n, Ls, 2, P, H, ps, D] -> [Ls, 2, P, n, H, ps, D]
        return [(k.at[:, pages].set(data[j, 0]), v.at[:, pages].set(data[j, 1])) for j, (k, v) in enumerate(kv)]

    def _copy_executable(self, kind: str, num: int) -> Any:
        key = (kind, num)
        exe = self._compiled.get(key)
        if exe is not None:
            return exe
        pages = jax.ShapeDtypeStruct((num,), jnp.int32)
        logging.info("compiling page %s of %d pages", kind, num)
        if kind == "read":
            exe = jax.jit(self._read_fn).lower(self.kv, pages).compile()
        else:
            data = jax.ShapeDtypeStruct((num, *self.page_shape), self.kv[0][0].dtype, sharding=self._page_sharding)
            exe = jax.jit(self._write_fn, donate_argnums=(0,)).lower(self.kv, pages, data).compile()
        self._compiled[key] = exe
        self.compile_count += 1
        return exe

    @functools.cached_property
    def _page_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(PAGE_BATCH_AXES))

    def _copy_chunks(self, pages: list[int]) -> list[tuple[int, np.ndarray]]:
        """Splits a page list into bucket-sized copies: (pages in the copy, page ids padded with the trash page)."""
        out = []
        largest = self.copy_buckets[-1]
        for i in range(0, len(pages), largest):
            part = pages[i: i + largest]
            ids = np.zeros(_bucket(len(part), self.copy_buckets, "pages per copy"), np.int32)
            ids[: len(part)] = part
            out.append((len(part), ids))
        return out

    def read_pages(self, pages: list[int]) -> list[PagePayload]:
        """Starts copying `pages` out of the pool (asynchronous: no step waits for it); one payload per page."""
        payloads: list[PagePayload] = []
        with self._lock:
            for count, ids in self._copy_chunks(pages):
                batch = _PageBatch(self._copy_executable("read", len(ids))(self.kv, ids))
                payloads += [PagePayload(batch, i) for i in range(count)]
        return payloads

    def write_pages(self, pages: list[int], payloads: list[Any]) -> None:
        """Copies each payload (anything with `numpy()` giving one page) into its page of the pool, ahead of any
        later step."""
        if len(pages) != len(payloads):
            raise ValueError(f"{len(pages)} pages but {len(payloads)} payloads")
        start = 0
        for count, ids in self._copy_chunks(pages):
            data = np.zeros((len(ids), *self.page_shape), self.page_dtype)
            for i, payload in enumerate(payloads[start: start + count]):
                data[i] = payload.numpy()
            start += count
            placed = jax.device_put(data, self._page_sharding)
            with self._lock:
                self.kv = self._copy_executable("write", len(ids))(self.kv, ids, placed)

    # ----- running -----

    def _pack(self, batch: StepBatch, decode: bool) -> tuple[int, int, int, np.ndarray, np.ndarray]:
        """The batch padded to its buckets (rows, length, pages) and packed into the step's two host arrays (see
        `_int_columns`). Why two: every host array a dispatch takes costs CPU time, and on a CPU backend that time
        is taken from the cores running the previous step (bench-110m at batch 8: twelve arrays and a separate feed
        gather took 1.08 ms of host CPU per decode call, these two and the feed inside the step 0.81)."""
        r = self.config.runner
        b, t = batch.tokens.shape
        n = batch.block_table.shape[1]
        if decode:
            rows, length = _bucket(b, self.decode_buckets, "batch rows"), 1
        else:
            rows = 1 if b == 1 else _bucket(b, r.batch_buckets, "batch rows")  # one sequence pays for no padding
            length = _bucket(t, self.prefill_buckets, "prefill chunk length")
        pages = _bucket(n, self.page_buckets, "pages per sequence")
        ints = np.zeros((rows, _int_columns(length, pages)), np.int32)
        ints[:, length: 2 * length] = -1  # positions of padding
        ints[:, 2 * length: 3 * length] = TRASH_SLOT
        col = functools.partial(_int_column, length, pages)
        ints[:, col("feed")] = -1  # no feed source
        ints[:b, :t] = batch.tokens
        ints[:b, length: length + t] = batch.positions
        ints[:b, 2 * length: 2 * length + t] = batch.slots
        ints[:b, 3 * length: 3 * length + n] = batch.block_table
        ints[:b, col("last_index")] = batch.last_index
        ints[:b, col("top_k")] = batch.top_k
        ints[:b, col("seed")] = np.asarray(batch.seed, np.uint32).view(np.int32)
        if batch.logprobs is not None:
            ints[:b, col("logprobs")] = batch.logprobs
        d = self.config.model.head_dim
        floats = np.zeros((rows, _float_columns(length, d)), np.float32)
        floats[:, 1] = 1.0  # top_p of padding
        floats[:b, 0] = batch.temperature
        floats[:b, 1] = batch.top_p
        # RoPE tables from the positions, here rather than in the step: XLA fuses cos and sin into each layer's
        # RoPE of q and of k and recomputes them per head there (XLA:CPU: ~25 us of each of those 24 fusions in a
        # 110M decode step).
        cos, sin = llama.rope_cos_sin(ints[:, length: 2 * length], self._inv_freq, np)
        floats[:, 2: 2 + length * d] = cos.reshape(rows, -1)
        floats[:, 2 + length * d:] = sin.reshape(rows, -1)
        return rows, length, pages, ints, floats

    def _run(self, batch: StepBatch, decode: bool, all_logits: bool = False, feed: Feed | None = None) -> Any:
        rows, length, pages, ints, floats = self._pack(batch, decode)
        with self._lock:
            src = ints[:, _int_column(length, pages, "feed")]
            fed = self._no_ids(rows) if feed is None else self._fed(feed, rows, src)
            exe = self._executable(rows, length, pages, all_logits)
            out, self.kv = exe(self.params, self.kv, ints, floats, fed)
        return out

    def _fed(self, feed: Feed, rows: int, src: np.ndarray) -> jax.Array:
        """The ids [rows] a decode step takes its fed tokens from, writing each row's index into them to `src`.

        The steady state (one decode call after another in the same rows bucket) passes the previous call's ids
        as they are; anything else is gathered into row order first."""
        src[: len(feed.rows)] = feed.rows
        if feed.tokens is not None and feed.tokens.shape[0] == rows and not feed.prefill:
            return feed.tokens
        ids = feed.tokens if feed.tokens is not None else self._no_ids(self.decode_buckets[0])
        prefill = list(feed.prefill) + [self._no_ids(1)] * (self.config.runner.max_batch - len(feed.prefill))
        fed = self._feed_executable(ids.shape[0], rows)(ids, prefill, src.copy())
        src[: len(feed.rows)] = np.where(feed.rows >= 0, np.arange(len(feed.rows)), -1)
        return fed

    def _no_ids(self, size: int) -> jax.Array:
        """Zero ids [size] on the mesh, standing in for a `Feed` slot the previous step did not fill."""
        if size not in self._no_ids_cache:
            self._no_ids_cache[size] = jax.device_put(np.zeros(size, np.int32),
                                                      NamedSharding(self.mesh, PartitionSpec()))
        return self._no_ids_cache[size]

    def prefill(self, batch: StepBatch) -> Sampled:
        """Writes a chunk of prompt tokens (any start position) into the pool and samples after each row's last.

        Returns device arrays [rows bucket, ...]; the caller reads the first `batch.num_rows` rows.
        """
        return self._run(batch, decode=False)

    def decode(self, batch: StepBatch, feed: Feed | None = None) -> Sampled:
        """Appends one token per row and samples the next; returns device arrays like `prefill`. With `feed`, rows
        take their input token from a previous step's outputs on the device (see `Feed`)."""
        if batch.tokens.shape[1] != 1:
            raise ValueError(f"decode takes one token per row, got {batch.tokens.shape[1]}")
        if feed is not None and feed.rows.shape != (batch.num_rows,):
            raise ValueError(f"feed.rows must hold one source row per batch row ({batch.num_rows}), got shape "
                             f"{feed.rows.shape}")
        if feed is not None and len(feed.prefill) > self.config.runner.max_batch:
            raise ValueError(f"feed.prefill holds {len(feed.prefill)} arrays, more than runner.max_batch="
                             f"{self.config.runner.max_batch}")
        return self._run(batch, decode=True, feed=feed)

    def logits(self, batch: StepBatch, decode: bool = False) -> np.ndarray:
        """Float32 logits [B, T, V] of every token of a chunk, through the prefill (or, with `decode`, the decode)
        bucket; writes KV exactly like `prefill` / `decode`. For scoring and parity tests."""
        out = self._run(batch, decode=decode, all_logits=True)
        return np.asarray(out)[: batch.num_rows, : batch.tokens.shape[1]]
