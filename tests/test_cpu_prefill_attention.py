"""jaxserve/kernels/attention.py's paged prefill kernel against a float64 dense reference and the pure-JAX chunk path
of models/attention.py: chunks starting at 0, after a prefix already in the pool (also mid-page), grouped queries,
head dims that are and are not a multiple of the vector width, page sizes below and at the vector width, sliding
windows, padding queries at the end of a row, non-contiguous positions, block tables whose unused columns and
slots hold garbage, and inside jax.jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import _dense
from test_cpu_attention import scattered_pools

from jaxserve.kernels import build

if not build.available():
    pytest.skip(f"CPU kernels unavailable: {build.unavailable_reason()}", allow_module_level=True)

from jaxserve.kernels.attention import paged_prefill_attention  # noqa: E402
from models import attention  # noqa: E402


def _problem(rng: np.random.RandomState, starts: list[int], lengths: list[int], steps: int, kv_heads: int,
             groups: int, head_dim: int, page_size: int) -> tuple[np.ndarray, ...]:
    """Row r holds a prefix of starts[r] keys plus a chunk of lengths[r] <= steps queries (the rest padding, -1).

    Pages are distinct and scattered; the block table has at least one unused column, and unused columns point at
    garbage pages; slots past a row's last key hold garbage too."""
    b = len(starts)
    ends = [s + n for s, n in zip(starts, lengths, strict=True)]
    cols = max(-(-e // page_size) for e in ends) + 1
    k_pool, v_pool, table = scattered_pools(rng, ends, cols, kv_heads, head_dim, page_size)
    positions = np.full((b, steps), -1, np.int32)
    for r, (start, end) in enumerate(zip(starts, ends, strict=True)):
        positions[r, : end - start] = np.arange(start, end)
    q = rng.randn(b, steps, kv_heads, groups, head_dim).astype(np.float32)
    return q, k_pool, v_pool, table, positions


def _reference(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray, table: np.ndarray, positions: np.ndarray,
               window: int) -> np.ndarray:
    """Dense float64 attention of each row's queries over its keys laid out contiguously; zeros for padding."""
    page_size = k_pool.shape[2]
    out = np.zeros(q.shape, np.float64)
    for r in range(q.shape[0]):
        valid = positions[r] >= 0
        if not valid.any():
            continue
        j = np.arange(min(positions[r].max() + 1, table.shape[1] * page_size))
        keys = k_pool[table[r, j // page_size], :, j % page_size].astype(np.float64)  # [S, Hkv, D]
        values = v_pool[table[r, j // page_size], :, j % page_size].astype(np.float64)
        out[r, valid] = _dense(q[r, valid].astype(np.float64), keys, values, positions[r, valid], window)
    return out


def _run(*arrays: np.ndarray, window: int) -> np.ndarray:
    return np.asarray(paged_prefill_attention(*map(jnp.asarray, arrays), window))


def _check(problem: tuple[np.ndarray, ...], window: int) -> None:
    got = _run(*problem, window=window)
    np.testing.assert_allclose(got, _reference(*problem, window), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 7, 40])
@pytest.mark.parametrize(("kv_heads", "groups", "head_dim", "page_size"),
                         [(2, 1, 64, 16), (1, 2, 8, 4), (3, 4, 16, 16), (2, 2, 64, 4), (1, 1, 16, 16)])
@pytest.mark.parametrize("steps", [2, 5, 16, 33, 64])
def test_chunks_equal_dense_attention(steps: int, kv_heads: int, groups: int, head_dim: int, page_size: int,
                                      window: int) -> None:
    """Three rows: a chunk from position 0; one after a prefix ending mid-page; one with padding at the end."""
    rng = np.random.RandomState(steps * 1000 + groups * 100 + head_dim + page_size + window)
    starts = [0, 2 * page_size + 3, page_size]
    lengths = [steps, steps, max(steps - 3, 1)]
    _check(_problem(rng, starts, lengths, steps, kv_heads, groups, head_dim, page_size), window)


@pytest.mark.parametrize("start", [0, 1, 15, 16, 100])
@pytest.mark.parametrize("window", [0, 19])
def test_single_row_chunks(start: int, window: int) -> None:
    """B = 1, bench-like shapes (D = 64, page_size 16), chunks starting on and off page boundaries."""
    rng = np.random.RandomState(start + window)
    _check(_problem(rng, [start], [33], 40, 2, 1, 64, 16), window)


@pytest.mark.parametrize("window", [0, 5])
def test_non_contiguous_positions(window: int) -> None:
    """Each query masks by its own position: shuffled, gapped, repeated positions and padding in between; a tile
    whose key range holds blocks no query may see under the window."""
    rng = np.random.RandomState(7 + window)
    q, k_pool, v_pool, table, positions = _problem(rng, [72], [48], 48, 2, 2, 16, 4)  # keys 0..119 filled
    order = rng.permutation(120)[:48]
    order[[3, 4, 10, 30]] = [119, 2, 119, -1]
    order[40] = 0
    positions[0] = order
    _check((q, k_pool, v_pool, table, positions), window)


def test_padding_queries_give_zeros() -> None:
    problem = _problem(np.random.RandomState(0), [5, 0], [3, 0], 8, 2, 2, 16, 4)
    got = _run(*problem, window=0)
    assert np.all(got[0, 3:] == 0) and np.all(got[1] == 0)
    assert np.all(got[0, :3] != 0)


@pytest.mark.parametrize("window", [0, 9])
def test_matches_pure_jax_chunk_inside_jit(window: int) -> None:
    problem = _problem(np.random.RandomState(1), [0, 21, 40], [64, 64, 50], 64, 3, 2, 64, 16)
    q, k_pool, v_pool, table, pos = map(jnp.asarray, problem)
    kernel = np.asarray(jax.jit(paged_prefill_attention, static_argnums=5)(q, k_pool, v_pool, table, pos, window))
    pure = np.asarray(jax.jit(attention.paged_attention, static_argnums=5)(q, k_pool, v_pool, table, pos, window))
    valid = problem[4] >= 0  # pure JAX averages over all keys for a padding query; the kernel gives zeros
    np.testing.assert_allclose(kernel[valid], pure[valid], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(kernel, _reference(*problem, window), atol=2e-5, rtol=1e-5)


def test_page_id_out_of_range_fails_only_where_read() -> None:
    q, k_pool, v_pool, table, positions = _problem(np.random.RandomState(3), [5, 9], [3, 4], 4, 1, 1, 16, 4)
    table[:, -1] = [-7, 10_000]  # unused columns: never read
    _check((q, k_pool, v_pool, table, positions), window=0)
    table[1, 2] = k_pool.shape[0]  # holds row 1's positions 9..11
    with pytest.raises(Exception, match=r"block_table\[1, 2\] = .* is outside"):
        _run(q, k_pool, v_pool, table, positions, window=0)


def test_rejects_bad_dtypes_and_shapes() -> None:
    q, k_pool, v_pool, table, positions = map(jnp.asarray, _problem(np.random.RandomState(4), [3], [2], 2, 1, 1, 8,
                                                                    4))
    with pytest.raises(ValueError, match="float32"):
        paged_prefill_attention(q, k_pool.astype(jnp.bfloat16), v_pool, table, positions)
    with pytest.raises(ValueError, match=r"\[B, T, Hkv, G, D\]"):
        paged_prefill_attention(q[:, 0], k_pool, v_pool, table, positions)
    with pytest.raises(ValueError, match="positions"):
        paged_prefill_attention(q, k_pool, v_pool, table, positions[:, :1])
    with pytest.raises(ValueError, match="sliding_window"):
        paged_prefill_attention(q, k_pool, v_pool, table, positions, -1)
