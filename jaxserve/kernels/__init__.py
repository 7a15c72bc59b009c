"""Hand-written CPU kernels for the serving steps, called from jitted steps through XLA's FFI.

XLA:CPU is far from the machine's limits on the shapes serving lives on: small-M matmuls against every weight
(`matmul.py`, memory-bound in decode), attention of one query per row over its KV pages, and chunked causal
attention of a prefill chunk over its pages (`attention.py`), the max / first argmax / log-sum-exp per row that
greedy decoding and logprobs need (`logit_stats.py`); and the read-bandwidth probe benchmarks measure rooflines
with (`bandwidth.py`). These kernels are C++ compiled on first use for the
host CPU (`build.py`); where no compiler is present the runner keeps the pure-JAX path, which TPU and GPU always
use.
"""
