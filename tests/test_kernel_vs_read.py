"""benchmarks/kernel_vs_read.py: the harness builds against the current kernel sources and reports its three
rates for both kernels (run end to end on tiny shapes; its numbers are not checked, only that they are there)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.kernels import build

if not build.available():
    pytest.skip(f"CPU kernels unavailable: {build.unavailable_reason()}", allow_module_level=True)

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "kernel_vs_read.py"
RATE = r"(\d+\.\d)"


@pytest.mark.parametrize("args", [
    ["attention", "--batch=3", "--context=40", "--kv_heads=2", "--groups=2", "--head_dim=32", "--page_size=16",
     "--layers=2", "--offset=64"],
    ["matmul", "--rows=3", "--k=100", "--n=130", "--matrices=2"],
])
def test_reports_kernel_read_and_probe_rates(args: list[str]) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--threads=2", "--rounds=3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rates = re.search(rf"kernel {RATE}, read of its bytes {RATE}, probe \(8 runs per thread\) {RATE}", done.stdout)
    assert rates is not None, done.stdout
    # The rates are medians printed to 0.1 GB/s, and these shapes are tiny: on a loaded machine one may print 0.0.
    # The ratios come from the unrounded per-round rates, so each must be a positive number.
    ratios = re.search(r"read / kernel (\d+\.\d{3}) .*probe / read (\d+\.\d{3}) .*kernel / probe (\d+\.\d{3})",
                       done.stdout)
    assert ratios is not None, done.stdout
    assert all(float(r) > 0 for r in ratios.groups()), done.stdout


def test_without_a_kernel_named_it_says_which_to_choose() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "attention or matmul" in done.stderr


def test_a_head_dim_the_read_cannot_cover_is_refused_with_why() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "attention", "--head_dim=40"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "--head_dim=40" in done.stderr and "multiple of 16" in done.stderr
