"""Where a CPU kernel's time goes against the roofline: the kernel, a bare read of its bytes, and the probe.

Builds `kernel_vs_read.cc` against the repository's kernel sources (jaxserve/kernels/cpu, the same flags as
jaxserve.kernels.build) and runs it. Each round times, on the same threads and outside XLA: the kernel over its
working set; a bare read of that working set (decode attention: every row's pages, keys then values, heads side
by side; matmul: the packed weights in the kernel's order, one software prefetch per panel row); and the probe
(8 runs per thread, as decode_mbu.py's roofline) over as many bytes. Printed: median GB/s of each and the medians
of the per-round ratios: read / kernel is what the kernel's own work costs over its access order, probe / read
what that order costs against the best read. On a shared VM whose bandwidth drifts by 2x within seconds the ratios
repeat far better than the timings (with `--threads 1`, within ~2-4% from run to run; with both cores reading,
which is what a decode step does, ~5%), so two versions of a kernel can be compared by running this under each
tree, alternately.

    python benchmarks/kernel_vs_read.py attention --batch 8 --context 256
    python benchmarks/kernel_vs_read.py matmul --rows 8
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
from pathlib import Path

import jax.ffi
from absl import app, flags

from jaxserve.kernels import build

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "attention: decode rows.")
flags.DEFINE_integer("context", 256, "attention: tokens already cached per row (each row attends context + 1).")
flags.DEFINE_integer("kv_heads", 12, "attention: KV heads.")
flags.DEFINE_integer("groups", 1, "attention: query heads per KV head.")
flags.DEFINE_integer("head_dim", 64, "attention: head dimension.")
flags.DEFINE_integer("page_size", 16, "attention: tokens per page.")
flags.DEFINE_integer("layers", 12, "attention: layers, each with its own pools (so the pages come from memory).")
flags.DEFINE_integer("offset", 64, "attention: bytes past a 4 KB boundary where each pool starts (XLA:CPU: 64).")
flags.DEFINE_integer("rows", 8, "matmul: rows of x.")
flags.DEFINE_integer("k", 768, "matmul: K.")
flags.DEFINE_integer("n", 3072, "matmul: N.")
flags.DEFINE_integer("matrices", 24, "matmul: weight matrices read per round.")
flags.DEFINE_integer("threads", 2, "Threads both sides run on.")
flags.DEFINE_integer("rounds", 200, "Rounds, each timing the kernel and then the read.")


def compile_harness(out: Path) -> None:
    """The harness binary, built like the kernels' library (minus -shared/-fPIC) against the same sources."""
    cxx = build.compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler found (CXX, g++, c++, clang++)")
    flags_ = [f for f in build.FLAGS if f not in ("-shared", "-fPIC")]
    done = subprocess.run([cxx, *flags_, "-pthread", f"-I{jax.ffi.include_dir()}", f"-I{build.SOURCE_DIR}",
                           str(Path(__file__).with_suffix(".cc")), "-o", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building the harness failed:\n{done.stderr}")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in ("attention", "matmul"):
        raise app.UsageError("say which kernel: attention or matmul")
    kind = argv[1]
    if kind == "attention":
        if FLAGS.head_dim % 16 != 0:
            raise app.UsageError(f"--head_dim={FLAGS.head_dim}: the read covers whole vectors, so it must be a "
                                 "multiple of 16")
        args = [FLAGS.batch, FLAGS.context, FLAGS.kv_heads, FLAGS.groups, FLAGS.head_dim, FLAGS.page_size,
                FLAGS.layers, FLAGS.offset]
    else:
        args = [FLAGS.rows, FLAGS.k, FLAGS.n, FLAGS.matrices]
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "kernel_vs_read"
        compile_harness(binary)
        out = subprocess.run([str(binary), kind, *map(str, args), str(FLAGS.threads), str(FLAGS.rounds)],
                             check=True, capture_output=True, text=True).stdout
    rates = [tuple(map(float, line.split())) for line in out.splitlines()]
    kernel, read, probe = ([r[i] for r in rates] for i in range(3))

    def ratio(a: list[float], b: list[float]) -> str:
        q1, q2, q3 = statistics.quantiles([x / y for x, y in zip(a, b, strict=True)], n=4)
        return f"{q2:.3f} (quartiles {q1:.3f}-{q3:.3f})"

    print(f"{kind} {' '.join(map(str, args))}, {FLAGS.threads} threads, {len(rates)} rounds")
    print(f"  GB/s, medians: kernel {statistics.median(kernel):.1f}, read of its bytes {statistics.median(read):.1f}, "
          f"probe (8 runs per thread) {statistics.median(probe):.1f}")
    print(f"  per round: read / kernel {ratio(read, kernel)}; probe / read {ratio(probe, read)}; "
          f"kernel / probe {ratio(kernel, probe)}")


if __name__ == "__main__":
    app.run(main)
