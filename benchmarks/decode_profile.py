"""Where a decode step's time goes: traces decode steps of the runner and prints the time per model region.

The steps run as `decode_mbu.py` runs them, and take its flags (`--configs`, `--batches`, `--context`, `--steps`,
`--cpu_kernels`, `--async_scheduling`, `--set`): each combination is traced under `jax.profiler`, and each region is
a Flax module path from the step's HLO (`DecoderLayer/mlp/mlp/ffi_call [jaxserve_packed_matmul]`, all layers
together) with the share of the step it took. Tracing slows the step a little; compare regions within one run, not
step times across runs.

    python benchmarks/decode_profile.py --configs configs/bench-110m.toml --batches 8 --cpu_kernels auto
"""

from __future__ import annotations

import tempfile

import jax
from absl import app, flags
from decode_mbu import bench_decode

from jaxserve.allocator import reexec_under_tcmalloc
from jaxserve.bench.profile import load_trace, op_labels, regions
from jaxserve.config import load_config
from jaxserve.runner import Runner

FLAGS = flags.FLAGS
flags.DEFINE_integer("top", 25, "Regions printed per profile, largest first.")

STEP_MODULE = "jit__step"  # the HLO module of Runner's prefill/decode step


def profile(runner: Runner, rows: int) -> None:
    """Times `--steps` steps untraced (which also compiles and warms), traces as many, prints the regions."""
    untraced = bench_decode(runner, rows, FLAGS.context, FLAGS.steps, FLAGS.async_scheduling)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        try:
            bench_decode(runner, rows, FLAGS.context, FLAGS.steps, FLAGS.async_scheduling)
        finally:
            jax.profiler.stop_trace()
        events = load_trace(trace_dir)
    step_ms, found = regions(events, op_labels(runner.hlo_texts()), STEP_MODULE)
    print(f"\n{runner.config.model.name}, batch {rows}, context {FLAGS.context}, cpu_kernels={runner.cpu_kernels}: "
          f"{untraced * 1e3:.2f} ms per step untraced, {step_ms:.2f} ms per traced step on the device")
    print(f"{'ms/step':>8} {'share':>6} {'ops/step':>8}  region")
    for r in found[:FLAGS.top]:
        print(f"{r.ms:>8.3f} {r.ms / step_ms:>6.1%} {r.ops:>8.1f}  {r.label}")
    rest = found[FLAGS.top:]
    if rest:
        ms = sum(r.ms for r in rest)
        print(f"{ms:>8.3f} {ms / step_ms:>6.1%} {sum(r.ops for r in rest):>8.1f}  ({len(rest)} more regions)")


def main(argv: list[str]) -> None:
    del argv
    batches = sorted({int(b) for b in FLAGS.batches})
    for path in FLAGS.configs:
        for mode in FLAGS.cpu_kernels:
            config = load_config(path, ["runner.warmup=false", f"runner.batch_buckets={batches}",
                                        f"runner.cpu_kernels={mode}", *FLAGS.set])
            runner = Runner(config)
            for rows in batches:
                profile(runner, rows)
            del runner


if __name__ == "__main__":
    reexec_under_tcmalloc()  # as jaxserve-serve runs
    app.run(main)
