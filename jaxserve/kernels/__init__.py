"""Hand-written CPU kernels for the decode hot path, called from jitted steps through XLA's FFI.

XLA:CPU is far from the memory-bandwidth roofline on the two shapes decode lives on: small-M matmuls against every
weight (`matmul.py`) and attention of one query per row over its KV pages. These kernels are C++ compiled on first
use for the host CPU (`build.py`); where no compiler is present the runner keeps the pure-JAX path, which TPU and
GPU always use.
"""
