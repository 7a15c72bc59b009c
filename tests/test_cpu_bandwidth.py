"""jaxserve/kernels/bandwidth.py (the read-bandwidth probe kernel): it reads every element, whatever the size and
the number of runs per thread."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.kernels import build

if not build.available():
    pytest.skip(f"CPU kernels unavailable: {build.unavailable_reason()}", allow_module_level=True)

from jaxserve.kernels.bandwidth import stream_read  # noqa: E402


@pytest.mark.parametrize("n", [1, 63, 64, 1000, 4096 * 3 + 17])
@pytest.mark.parametrize("streams", [1, 3, 8, 16])
def test_stream_read_sums_every_element(n: int, streams: int) -> None:
    x = np.random.default_rng(n + streams).integers(-8, 8, n).astype(np.float32)  # integers: the sum is exact
    got = jax.jit(stream_read, static_argnums=1)(jnp.asarray(x), streams)
    assert float(got) == float(x.astype(np.float64).sum())


def test_stream_read_refuses_fewer_than_one_run() -> None:
    with pytest.raises(ValueError, match="streams must be >= 1"):
        stream_read(jnp.ones(8), 0)
