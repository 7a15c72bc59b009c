"""Decode throughput and memory-bandwidth utilisation (MBU) of the runner, against this machine's measured roofline.

For each config and batch size: fill `--context` tokens of KV per row, then time `--steps` decode steps through
`Runner.decode` exactly as the engine calls it: one device-to-host read of the sampled ids per step, and with
`--async_scheduling` (the engine's default) each step dispatched with its input ids fed on the device from the
previous step, whose ids are read back only then, so the host's work overlaps the device's.
MBU = (bytes of weights + KV read per step) / step time / roofline, where the roofline is the best of the read
probes over `--bandwidth_gib` GiB on the same devices (a jitted float32 sum, and the CPU kernels' read with several
runs per thread: see jaxserve/kernels/cpu/bandwidth.cc), measured right before the timed steps. Each batch size is
measured `--repeats` times and the median repeat is reported; "MBU (run best)" divides the fastest repeat by the
best probe of the whole run instead, the stricter figure. The last two columns are the rates at which a chain of
matmuls of that batch size reads its weights here, with XLA's own dot and with the CPU matmul kernel
(jaxserve/kernels): the practical ceilings. `--cpu_kernels` lists the
`runner.cpu_kernels` settings to measure, so one run compares the kernels against the pure-JAX path.

    python benchmarks/decode_mbu.py --configs configs/default.toml,configs/bench-110m.toml --batches 1,8,32
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxserve.allocator import reexec_under_tcmalloc
from jaxserve.config import Config, load_config
from jaxserve.kernels import build as kernels
from jaxserve.kernels.bandwidth import stream_read
from jaxserve.kernels.matmul import pack, packed_matmul
from jaxserve.kv.pages import block_table_array, pages_for
from jaxserve.runner import Feed, Runner, StepBatch
from jaxserve.sampling import Sampled
from models import llama

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["configs/default.toml", "configs/bench-110m.toml"], "Config files to measure.")
flags.DEFINE_list("batches", ["1", "8", "32"], "Decode batch sizes.")
flags.DEFINE_integer("context", 256, "Tokens already in each row's KV cache.")
flags.DEFINE_integer("steps", 64, "Timed decode steps per batch size and repeat.")
flags.DEFINE_integer("repeats", 3, "Times each batch size is measured, each right after its own bandwidth probe.")
flags.DEFINE_float("bandwidth_gib", 1.0, "Size of the array the bandwidth probes read.")
flags.DEFINE_list("cpu_kernels", ["auto", "off"], "runner.cpu_kernels settings to measure, each in turn.")
flags.DEFINE_bool("async_scheduling", True, "Feed each step's input ids from the previous step on the device and "
                  "read them back after dispatching the next, as the engine's engine.async_scheduling does.")
flags.DEFINE_multi_string("set", [], "Overrides applied to every config (section.field=value).")
flags.DEFINE_string("json_out", "", "Also write the results as JSON here.")


def _best_seconds(f, *args) -> float:
    """Best of 5 timed calls of jitted `f`, after one untimed call that compiles it."""
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(gib: float) -> dict[str, float]:
    """Bytes/s of reading `gib` GiB of float32 once, by each probe: a jitted XLA sum, and (kernels built) the
    CPU kernels' read with 1, 2, 4, 8 and 16 interleaved runs per thread. The roofline is the best of them: on some
    CPUs one run per core reads far below what several runs in flight do."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    rates = {"xla_sum": x.nbytes / _best_seconds(jax.jit(jnp.sum), x)}
    if kernels.available():
        for streams in (1, 2, 4, 8, 16):
            read = jax.jit(functools.partial(stream_read, streams=streams))
            rates[f"read_{streams}_runs"] = x.nbytes / _best_seconds(read, x)
    return rates


def measure_matmul_bandwidth(rows: int, kernel: bool, width: int = 768, depth: int = 36) -> float:
    """Bytes/s at which a chain of jitted [rows, width] x [width, 4 * width] float32 matmuls reads its weights,
    on XLA's dot or (`kernel`) on the packed CPU matmul kernel.

    The ceiling the decode's weight reads can reach at this batch size; on some CPUs XLA's small-M matmuls stream
    weights at well under the reduction bandwidth.
    """
    keys = jax.random.split(jax.random.key(0), depth)
    weights = [jax.random.normal(k, (width, 4 * width), jnp.float32) for k in keys]
    x = jnp.ones((rows, width), jnp.float32)
    if kernel:
        weights = [pack(w) for w in weights]
        chain = jax.jit(lambda ws, x: sum(jnp.sum(packed_matmul(x, w, 4 * width)) for w in ws))
    else:
        chain = jax.jit(lambda ws, x: sum(jnp.sum(x @ w) for w in ws))
    return sum(w.nbytes for w in weights) / _best_seconds(chain, weights, x)


def _weight_bytes_read(config: Config) -> int:
    """Weight bytes a decode step reads: every weight once, except an untied embedding table (only looked up).

    Counted from the model's shapes, not the runner's arrays: packing for the CPU kernels pads and, with tied
    embeddings, holds the head twice, and neither is read twice.
    """
    tree = llama.abstract_params(config.model)
    total = sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
    if not config.model.tie_embeddings:
        total -= tree["embed"]["embedding"].size * jnp.dtype(tree["embed"]["embedding"].dtype).itemsize
    return total


def _kv_bytes_read(config: Config, rows: int, context: int) -> int:
    """KV bytes a decode step reads: every layer's keys and values of each row's (page-rounded) context."""
    m, c = config.model, config.cache
    tokens = pages_for(context + 1, c.page_size) * c.page_size
    itemsize = jnp.dtype(c.dtype).itemsize
    return rows * tokens * m.num_layers * 2 * max(m.num_kv_heads, config.mesh.tensor) * m.head_dim * itemsize


def bench_decode(runner: Runner, rows: int, context: int, steps: int, overlap: bool = True) -> float:
    """Seconds per decode step for `rows` rows at `context` tokens (sampled ids read back every step; `overlap`:
    after the next step is dispatched with them fed on the device, as the engine's asynchronous scheduling does)."""
    config = runner.config
    ps = config.cache.page_size
    per_row = pages_for(context + steps + 4, ps)
    tables = [list(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(rows)]
    if 1 + rows * per_row > config.cache.num_pages:
        raise ValueError(f"{rows} rows x {per_row} pages exceed cache.num_pages={config.cache.num_pages}")
    zeros_f, zeros_i = np.zeros(rows, np.float32), np.zeros(rows, np.int32)
    every_row = np.arange(rows, dtype=np.int32)

    def step(pos: int, previous: Sampled | None) -> Sampled:
        width = pages_for(pos + 1, ps)
        table = block_table_array([t[:width] for t in tables], width)
        slots = table[:, pos // ps] * ps + pos % ps
        batch = StepBatch(np.full((rows, 1), 7, np.int32), np.full((rows, 1), pos, np.int32), slots[:, None],
                          table, zeros_i, zeros_f, zeros_i, np.ones(rows, np.float32), np.zeros(rows, np.uint32))
        if not overlap:
            out = runner.decode(batch)
            np.asarray(out.token)
            return out
        out = runner.decode(batch, None if previous is None else Feed(previous.token, every_row))
        if previous is not None:
            np.asarray(previous.token)
        return out

    def run(first: int, count: int) -> None:
        previous = None
        for pos in range(first, first + count):
            previous = step(pos, previous)
        np.asarray(previous.token)

    run(context, 3)  # compile and warm
    t0 = time.perf_counter()
    run(context, steps)
    return (time.perf_counter() - t0) / steps


def main(argv: list[str]) -> None:
    del argv
    probes = measure_bandwidth(FLAGS.bandwidth_gib)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} bandwidth probes: "
          + ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in probes.items()) + " GB/s")
    best_probe = max(probes.values())
    batches = [int(b) for b in FLAGS.batches]
    matmul = {rows: measure_matmul_bandwidth(rows, kernel=False) for rows in batches}
    kernel_matmul = {rows: measure_matmul_bandwidth(rows, kernel=True) if kernels.available() else float("nan")
                     for rows in batches}
    results = []
    for path in FLAGS.configs:
        for mode in FLAGS.cpu_kernels:
            config = load_config(path, ["runner.warmup=false", f"runner.batch_buckets={sorted(set(batches))}",
                                        f"runner.cpu_kernels={mode}", *FLAGS.set])
            runner = Runner(config)
            weights = _weight_bytes_read(config)
            print(f"\n{config.model.name}, cpu_kernels={mode} (used: {runner.cpu_kernels}): {weights / 1e6:.1f} MB "
                  f"of weights ({config.model.param_dtype}), context {FLAGS.context}")
            print(f"{'batch':>5} {'step ms':>8} {'tok/s':>8} {'MB read':>8} {'roofline':>9} {'MBU':>6} "
                  f"{'MBU (run best)':>14} {'xla mm GB/s':>12} {'kernel mm GB/s':>15}")
            for rows in batches:
                read = weights + _kv_bytes_read(config, rows, FLAGS.context)
                runs = []  # (MBU, seconds, roofline) of each repeat
                for _ in range(FLAGS.repeats):
                    # The VM's bandwidth drifts by tens of percent over minutes: each timing is divided by the best
                    # probe taken just before it, in the same conditions.
                    roofline = max(measure_bandwidth(FLAGS.bandwidth_gib).values())
                    best_probe = max(best_probe, roofline)
                    seconds = bench_decode(runner, rows, FLAGS.context, FLAGS.steps, FLAGS.async_scheduling)
                    runs.append((read / seconds / roofline, seconds, roofline))
                mbu, seconds, roofline = sorted(runs)[len(runs) // 2]  # the median repeat
                fastest = min(r[1] for r in runs)
                print(f"{rows:>5} {seconds * 1e3:>8.2f} {rows / seconds:>8.1f} {read / 1e6:>8.1f} "
                      f"{roofline / 1e9:>9.1f} {mbu:>6.1%} {read / fastest / best_probe:>14.1%} "
                      f"{matmul[rows] / 1e9:>12.1f} {kernel_matmul[rows] / 1e9:>15.1f}")
                results.append({"model": config.model.name, "cpu_kernels": runner.cpu_kernels, "batch": rows,
                                "step_ms": seconds * 1e3, "tokens_per_s": rows / seconds, "bytes_per_step": read,
                                "mbu": mbu, "bandwidth_gbs": roofline / 1e9,
                                "repeats": [{"mbu": m, "step_ms": t * 1e3, "bandwidth_gbs": b / 1e9}
                                            for m, t, b in runs],
                                "xla_matmul_gbs": matmul[rows] / 1e9, "kernel_matmul_gbs": kernel_matmul[rows] / 1e9})
            del runner
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    reexec_under_tcmalloc()  # as jaxserve-serve runs
    app.run(main)
