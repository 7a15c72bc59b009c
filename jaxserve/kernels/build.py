"""Compiles the C++ CPU kernels once per host and registers them as XLA FFI targets.

The sources are built on first use with the system C++ compiler for the host's own instruction set
(`-march=native`: the kernels are only as fast as the vector width they are compiled for), against the XLA FFI
headers that ship with jaxlib, into a cache keyed by sources, flags, compiler and jaxlib version. A host without
a compiler, or where the build fails, gets `available() == False` and the reason, never an exception: the
pure-JAX path serves instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.ffi
from absl import logging

SOURCE_DIR = Path(__file__).parent / "cpu"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> exported handler symbol.
TARGETS = {
    "jaxserve_packed_matmul": "JaxservePackedMatmul",
    "jaxserve_paged_decode_attention": "JaxservePagedDecodeAttention",
    "jaxserve_paged_decode_attention_write": "JaxservePagedDecodeAttentionWrite",
    "jaxserve_paged_prefill_attention": "JaxservePagedPrefillAttention",
    "jaxserve_stream_read": "JaxserveStreamRead",
    "jaxserve_logit_stats": "JaxserveLogitStats",
}


def cache_dir() -> Path:
    """Where built libraries live: $JAXSERVE_KERNEL_CACHE, else ~/.cache/jaxserve/kernels."""
    env = os.environ.get("JAXSERVE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "jaxserve" / "kernels"


def compiler() -> str | None:
    """The C++ compiler the kernels build with: $CXX, else the first of g++, c++, clang++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _host_cpu() -> str:
    """What -march=native compiles for: the CPU's feature flags, so a cache shared across hosts never hands a
    library built for one CPU to another that lacks its instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _build(cxx: str) -> Path:
    sources = sorted(SOURCE_DIR.glob("*.cc"))
    headers = sorted(SOURCE_DIR.glob("*.h"))
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256()
    for part in (version, jax.__version__, platform.machine(), _host_cpu(), " ".join(FLAGS)):
        h.update(part.encode() + b"\0")
    for path in sources + headers:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    target = cache_dir() / f"libjaxserve_cpu_{h.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed, so concurrent processes never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{SOURCE_DIR}", *map(str, sources), "-o", tmp]
    logging.info("building CPU kernels: %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{cxx} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    os.replace(tmp, target)
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("JAXSERVE_CPU_KERNELS", "").lower() in ("0", "off", "false"):
        return None, "disabled by JAXSERVE_CPU_KERNELS"
    cxx = compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX)"
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        logging.warning("CPU kernels unavailable, using the pure-JAX path: %s", e)
        return None, str(e)
    return lib, ""


def available() -> bool:
    """Whether the CPU kernels are built and registered (building them on the first call)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _load()[1]


def _build_constant(symbol: str) -> int:
    """An int the library exports as `int symbol(void)`: a layout constant its kernels were compiled with."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"CPU kernels unavailable: {unavailable_reason()}")
    return int(getattr(lib, symbol)())


@functools.cache
def matmul_tile() -> int:
    """Columns per packed weight panel in this host's build: the register tile depends on the vector width
    `-march=native` compiled for (see cpu/matmul.cc), so weights are packed to match the library, not a constant."""
    return _build_constant("jaxserve_matmul_tile")


@functools.cache
def matmul_streams() -> int:
    """Runs each packed panel's K rows are split into in this host's build (see cpu/matmul.cc)."""
    return _build_constant("jaxserve_matmul_streams")
