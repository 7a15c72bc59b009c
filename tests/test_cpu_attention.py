"""jaxserve/kernels/attention.py (the CPU paged decode attention kernel) against a float64 dense reference and the
pure-JAX decode paths of models/attention.py: scattered pages, grouped queries, head dims that are and are not a
multiple of the vector width, sliding windows, padding rows, positions on page boundaries, block tables wider than
needed whose unused columns and slots hold garbage, and inside jax.jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import _dense

from jaxserve.kernels import build

if not build.available():
    pytest.skip(f"CPU kernels unavailable: {build.unavailable_reason()}", allow_module_level=True)

from jaxserve.kernels.attention import paged_decode_attention, paged_decode_attention_write  # noqa: E402
from models import attention  # noqa: E402

COLS = 6  # block-table columns; every row below needs at most COLS - 1, so the last column is always unused
GARBAGE = 1e3  # scale of the values in slots no row may read: a leak into any output is far past the tolerance


def _boundary_positions(page_size: int) -> list[int]:
    """Nine rows: padding, both sides of two page boundaries, the first key, and the largest context."""
    p = page_size
    return [0, p - 1, p, -1, 2 * p - 1, 2 * p, 3 * p + p // 2, 4 * p, (COLS - 1) * p - 1]


def scattered_pools(rng: np.random.RandomState, keys: list[int], cols: int, kv_heads: int, head_dim: int,
                    page_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k_pool, v_pool and a [len(keys), cols] block table where row r holds keys[r] random keys and values.

    Each row's pages are distinct and scattered; the columns a row does not need point at garbage pages, and slots
    past a row's last key hold garbage (GARBAGE-scaled) too."""
    b = len(keys)
    num_pages = b * cols + 5
    shape = (num_pages, kv_heads, page_size, head_dim)
    k_pool = (rng.randn(*shape) * GARBAGE).astype(np.float32)
    v_pool = (rng.randn(*shape) * GARBAGE).astype(np.float32)
    order = rng.permutation(num_pages)
    table = order[: b * cols].reshape(b, cols).astype(np.int32)
    garbage_pages = order[b * cols:]
    for r, n in enumerate(keys):
        used = -(-n // page_size)
        table[r, used:] = rng.choice(garbage_pages, cols - used)
        for c in range(used):
            filled = min(page_size, n - c * page_size)
            k_pool[table[r, c], :, :filled] = rng.randn(kv_heads, filled, head_dim)
            v_pool[table[r, c], :, :filled] = rng.randn(kv_heads, filled, head_dim)
    return k_pool, v_pool, table


def _problem(rng: np.random.RandomState, positions: list[int], kv_heads: int, groups: int, head_dim: int,
             page_size: int, cols: int = COLS) -> tuple[np.ndarray, ...]:
    """Random q, pools and a `cols`-column block table (see `scattered_pools`) for rows at `positions` (-1: padding,
    no keys)."""
    k_pool, v_pool, table = scattered_pools(rng, [pos + 1 if pos >= 0 else 0 for pos in positions], cols, kv_heads,
                                            head_dim, page_size)
    q = rng.randn(len(positions), 1, kv_heads, groups, head_dim).astype(np.float32)
    return q, k_pool, v_pool, table, np.asarray(positions, np.int32)[:, None]


def _reference(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray, table: np.ndarray, positions: np.ndarray,
               window: int) -> np.ndarray:
    """Dense float64 attention of each row over its keys laid out contiguously; zeros for rows with no key."""
    page_size = k_pool.shape[2]
    out = np.zeros(q.shape, np.float64)
    for r, pos in enumerate(positions[:, 0]):
        if pos < 0:
            continue
        j = np.arange(min(pos + 1, table.shape[1] * page_size))
        keys = k_pool[table[r, j // page_size], :, j % page_size].astype(np.float64)  # [S, Hkv, D]
        values = v_pool[table[r, j // page_size], :, j % page_size].astype(np.float64)
        out[r] = _dense(q[r].astype(np.float64), keys, values, positions[r], window)
    return out


def _run(*arrays: np.ndarray, window: int) -> np.ndarray:
    return np.asarray(paged_decode_attention(*map(jnp.asarray, arrays), window))


@pytest.mark.parametrize("window", [0, 5, 19])
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("head_dim", [8, 16, 64])
@pytest.mark.parametrize(("kv_heads", "groups"), [(2, 1), (1, 2), (3, 4)])
def test_decode_equals_dense_attention(kv_heads: int, groups: int, head_dim: int, page_size: int,
                                       window: int) -> None:
    rng = np.random.RandomState(kv_heads * 1000 + groups * 100 + head_dim + page_size + window)
    problem = _problem(rng, _boundary_positions(page_size), kv_heads, groups, head_dim, page_size)
    got = _run(*problem, window=window)
    np.testing.assert_allclose(got, _reference(*problem, window), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize(("kv_heads", "groups"), [(4, 5), (3, 3), (12, 1)])
def test_every_group_of_query_rows_accumulated_together_matches_dense_attention(kv_heads: int, groups: int,
                                                                               head_dim: int) -> None:
    """The kernel accumulates 256 / head_dim query rows' values at a time: full groups and a remainder of each."""
    rng = np.random.RandomState(kv_heads * 100 + groups * 10 + head_dim)
    problem = _problem(rng, _boundary_positions(16), kv_heads, groups, head_dim, 16)
    np.testing.assert_allclose(_run(*problem, window=0), _reference(*problem, 0), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", range(1, 10))
def test_every_batch_size_matches_dense_attention(batch: int) -> None:
    """Five KV heads: small batches split each row's heads into uneven blocks across the threads."""
    rng = np.random.RandomState(batch)
    positions = list(rng.randint(-1, (COLS - 1) * 16, batch))
    problem = _problem(rng, positions, 5, 2, 32, 16)
    np.testing.assert_allclose(_run(*problem, window=0), _reference(*problem, 0), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 300])
@pytest.mark.parametrize("head_dim", [24, 64])
def test_long_contexts_match_dense_attention(head_dim: int, window: int) -> None:
    """Contexts of up to 44 pages, past the 5 of the tests above: rows ending on both sides of 256-key boundaries,
    windows starting inside a page, vectorised and scalar head dims."""
    positions = [255, 256, 511, 512, 700, -1, 3]
    problem = _problem(np.random.RandomState(head_dim + window), positions, 3, 2, head_dim, 16, cols=48)
    np.testing.assert_allclose(_run(*problem, window=window), _reference(*problem, window), atol=2e-5, rtol=1e-5)


def _placed(a: np.ndarray, offset: int) -> jax.Array:
    """`a` on the CPU device at exactly `offset` bytes past a 4 KB boundary: device_put aliases a suitably aligned
    numpy buffer instead of copying it, so the kernel reads the pool where it was put."""
    buf = np.empty(a.size + 2048, a.dtype)
    start = (-buf.ctypes.data % 4096 + offset) // a.itemsize
    view = buf[start:start + a.size].reshape(a.shape)
    view[...] = a
    placed = jax.device_put(view)
    assert placed.unsafe_buffer_pointer() % 4096 == offset, "device_put copied: the pool is not where it was put"
    return placed


@pytest.mark.parametrize(("head_dim", "page_size"), [(64, 16), (128, 8), (32, 16)])
def test_the_same_output_wherever_the_pools_lie(head_dim: int, page_size: int) -> None:
    """Keys of full pages are scored from the first one past a 4 KB boundary of memory, wrapping round (a head's
    chunk of 4 KB, as for 64 x 16 and 128 x 8, usually straddles two): every offset gives the dense result, bit for
    bit the same, windows starting inside pages included."""
    rng = np.random.RandomState(head_dim + page_size)
    positions = [3 * page_size - 1, 2 * page_size + 5, page_size, -1, 5 * page_size - 1]
    q, k_pool, v_pool, table, pos = _problem(rng, positions, 3, 2, head_dim, page_size)
    for window in (0, page_size + 3):
        want = _reference(q, k_pool, v_pool, table, pos, window)
        first = None
        for offset in (0, 64, 1344, 2048, 4032):
            out = np.asarray(paged_decode_attention(jnp.asarray(q), _placed(k_pool, offset), _placed(v_pool, offset),
                                                    jnp.asarray(table), jnp.asarray(pos), window))
            np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5, err_msg=f"pools at +{offset} B")
            first = out if first is None else first
            np.testing.assert_array_equal(out, first, err_msg=f"pools at +{offset} B against aligned pools")


def test_padding_row_gives_zeros() -> None:
    problem = _problem(np.random.RandomState(0), [-1, 7, -1], 2, 2, 16, 4)
    got = _run(*problem, window=0)
    assert np.all(got[[0, 2]] == 0)
    assert np.all(got[1] != 0)


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("decode_path", ["gathered", "looped"])
def test_matches_pure_jax_decode_inside_jit(decode_path: str, window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if decode_path == "looped":
        monkeypatch.setattr(attention, "DECODE_GATHER_LIMIT", 0)
    positions = [p for p in _boundary_positions(16) if p >= 0]  # the gathered path averages a padding row's pages
    q, k_pool, v_pool, table, pos = map(jnp.asarray, _problem(np.random.RandomState(1), positions, 3, 2, 64, 16))
    kernel = jax.jit(paged_decode_attention, static_argnums=5)(q, k_pool, v_pool, table, pos, window)
    pure = jax.jit(attention.paged_attention, static_argnums=5)(q, k_pool, v_pool, table, pos, window)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(pure), atol=2e-5, rtol=1e-5)


def test_position_past_the_table_attends_over_its_columns() -> None:
    """A caller error, but bounded: the row attends over all COLS pages, and a window past them gives zeros."""
    page_size = 4
    problem = list(_problem(np.random.RandomState(2), [COLS * page_size - 1, -1], 2, 1, 16, page_size))
    full = _run(*problem, window=0)[0]
    problem[4] = np.asarray([[COLS * page_size + 9], [COLS * page_size + 9]], np.int32)
    np.testing.assert_array_equal(_run(*problem, window=0)[0], full)
    assert np.all(_run(*problem, window=5) == 0)


def test_page_id_out_of_range_fails_only_where_read() -> None:
    q, k_pool, v_pool, table, positions = _problem(np.random.RandomState(3), [5, 9], 1, 1, 16, 4)
    table[:, -1] = [-7, 10_000]  # unused columns: never read
    np.testing.assert_allclose(_run(q, k_pool, v_pool, table, positions, window=0),
                               _reference(q, k_pool, v_pool, table, positions, 0), atol=2e-5, rtol=1e-5)
    table[1, 2] = k_pool.shape[0]  # the page of row 1's own position 9
    with pytest.raises(Exception, match=r"block_table\[1, 2\] = .* is outside"):
        _run(q, k_pool, v_pool, table, positions, window=0)


def test_rejects_bad_dtypes_and_ranks() -> None:
    q, k_pool, v_pool, table, positions = map(jnp.asarray, _problem(np.random.RandomState(4), [3], 1, 1, 8, 4))
    with pytest.raises(ValueError, match="float32"):
        paged_decode_attention(q, k_pool.astype(jnp.bfloat16), v_pool, table, positions)
    with pytest.raises(ValueError, match=r"\[B, 1, Hkv, G, D\]"):
        paged_decode_attention(q[:, 0], k_pool, v_pool, table, positions)
    with pytest.raises(ValueError, match="positions"):
        paged_decode_attention(q, k_pool, v_pool, table, positions[:, 0])
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(q, k_pool, v_pool, table, positions, -1)


@pytest.mark.parametrize(("target", "q_steps", "v_pages", "pos_steps", "message"), [
    ("jaxserve_paged_decode_attention", 2, 8, 2, "one query per row"),
    ("jaxserve_paged_decode_attention", 1, 9, 1, "k_pool and v_pool differ"),
    ("jaxserve_paged_prefill_attention", 3, 8, 2, "shapes of q, pools, block_table, positions disagree"),
])
def test_the_kernels_themselves_reject_operands_that_do_not_fit(target: str, q_steps: int, v_pages: int,
                                                                pos_steps: int, message: str) -> None:
    """Called through the FFI directly (past the python wrappers' checks), a kernel names what is wrong."""
    q = jnp.zeros((2, q_steps, 2, 1, 16), jnp.float32)
    k_pool, v_pool = jnp.zeros((8, 2, 4, 16), jnp.float32), jnp.zeros((v_pages, 2, 4, 16), jnp.float32)
    table, positions = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, pos_steps), jnp.int32)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(call(q, k_pool, v_pool, table, positions, sliding_window=np.int32(0)))


def _rope_tables(rng: np.random.RandomState, batch: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    angles = rng.uniform(0, 2 * np.pi, (batch, 1, head_dim // 2))
    return (np.concatenate([np.cos(angles)] * 2, -1).astype(np.float32),
            np.concatenate([np.sin(angles)] * 2, -1).astype(np.float32))


def _write_problem(seed: int, positions: list[int], kv_heads: int, groups: int, head_dim: int, page_size: int
                   ) -> tuple[np.ndarray, ...]:
    """A decode step whose new keys and values are not in the pools: each real row's slot is its position in its
    own pages (holding garbage until written); padding rows point at a trash slot on a page no row reads."""
    rng = np.random.RandomState(seed)
    q, k_pool, v_pool, table, pos = _problem(rng, positions, kv_heads, groups, head_dim, page_size)
    read = {int(table[r, c]) for r, p in enumerate(positions) for c in range(p // page_size + 1) if p >= 0}
    trash = min(set(range(k_pool.shape[0])) - read) * page_size
    slots = np.asarray([[table[r, p // page_size] * page_size + p % page_size if p >= 0 else trash]
                        for r, p in enumerate(positions)], np.int32)
    for r, p in enumerate(positions):  # the new key's slot: garbage, as in a pool the step has not written yet
        if p >= 0:
            k_pool[slots[r, 0] // page_size, :, slots[r, 0] % page_size] = GARBAGE
            v_pool[slots[r, 0] // page_size, :, slots[r, 0] % page_size] = GARBAGE
    k_new, v_new = (rng.randn(len(positions), 1, kv_heads, head_dim).astype(np.float32) for _ in range(2))
    cos, sin = _rope_tables(rng, len(positions), head_dim)
    return q, k_new, v_new, cos, sin, k_pool, v_pool, table, pos, slots


def _packed(q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray) -> jax.Array:
    """q [B, 1, Hkv, G, D], k_new and v_new [B, 1, Hkv, D] as the packed projection gives them: [B, 1, Hkv * (G + 2),
    D]."""
    b, _, h, g, d = q.shape
    return jnp.concatenate([jnp.asarray(q).reshape(b, 1, h * g, d), jnp.asarray(k_new), jnp.asarray(v_new)], axis=2)


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize(("kv_heads", "groups", "head_dim", "page_size"), [(2, 1, 16, 4), (3, 4, 64, 16),
                                                                        (12, 1, 64, 16), (5, 2, 24, 8)])
def test_decode_write_equals_rope_scatter_then_attention(kv_heads: int, groups: int, head_dim: int, page_size: int,
                                                         window: int) -> None:
    """The fused call against the XLA path it replaces (apply_rope, write_kv into both pools, decode attention):
    the same output, and the same pools at every slot but the trash slot padding rows would have written."""
    from models.llama import apply_rope

    positions = [-1, 0, page_size - 1, page_size, 3 * page_size + 1, -1, 2 * page_size + 2]
    q, k_new, v_new, cos, sin, k_pool, v_pool, table, pos, slots = _write_problem(
        kv_heads * 100 + head_dim + window, positions, kv_heads, groups, head_dim, page_size)
    b = len(positions)

    def xla_path(q, k_new, v_new, cos, sin, k_pool, v_pool, table, pos, slots):
        qr = apply_rope(q.reshape(b, 1, kv_heads * groups, head_dim), cos, sin).reshape(q.shape)
        k_pool = attention.write_kv(k_pool, apply_rope(k_new, cos, sin), slots)
        v_pool = attention.write_kv(v_pool, v_new, slots)
        return paged_decode_attention(qr, k_pool, v_pool, table, pos, window), k_pool, v_pool

    args = tuple(map(jnp.asarray, (q, k_new, v_new, cos, sin, k_pool, v_pool, table, pos, slots)))
    want = jax.jit(xla_path)(*args)
    packed = (_packed(*args[:3]), *args[3:])
    got = jax.jit(lambda *a: paged_decode_attention_write(*a, window), donate_argnums=(3, 4))(*packed)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=2e-5, rtol=1e-5)
    real = np.asarray(positions) >= 0
    assert np.all(np.asarray(got[0])[~real] == 0)
    trash = slots[~real][0, 0]
    for g, w in zip(got[1:], want[1:], strict=True):
        g, w = np.array(g), np.array(w)
        # the trash slot: where XLA wrote the padding rows; the kernel writes nothing for them
        w[trash // page_size, :, trash % page_size] = g[trash // page_size, :, trash % page_size]
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-6)


def test_decode_write_refuses_a_slot_outside_the_pools_and_bad_shapes() -> None:
    q, k_new, v_new, cos, sin, k_pool, v_pool, table, pos, slots = map(
        jnp.asarray, _write_problem(5, [3, -1, 9], 2, 1, 16, 4))
    qkv = _packed(q, k_new, v_new)
    with pytest.raises(Exception, match=r"slots\[2\] = 1000000 is outside \[0, "):
        jax.block_until_ready(paged_decode_attention_write(
            qkv, cos, sin, k_pool, v_pool, table, pos, slots.at[2, 0].set(1_000_000)))
    # a padding row's slot is never written, so any value is accepted there
    jax.block_until_ready(paged_decode_attention_write(qkv, cos, sin, k_pool, v_pool, table, pos,
                                                       slots.at[1, 0].set(-5)))
    with pytest.raises(ValueError, match=r"qkv must be \[B, 1, Hkv \* \(G \+ 2\), D\] with the pools' Hkv = 2"):
        paged_decode_attention_write(qkv[:, :, :-1], cos, sin, k_pool, v_pool, table, pos, slots)
    with pytest.raises(ValueError, match=r"qkv must be"):
        paged_decode_attention_write(qkv[:, :, :4], cos, sin, k_pool, v_pool, table, pos, slots)  # no query heads
    with pytest.raises(ValueError, match=r"cos must be \[B, 1, D\]"):
        paged_decode_attention_write(qkv, cos[..., :8], sin, k_pool, v_pool, table, pos, slots)
    with pytest.raises(ValueError, match=r"slots must be \[B=3, 1\]"):
        paged_decode_attention_write(qkv, cos, sin, k_pool, v_pool, table, pos, slots[:, 0])
    with pytest.raises(ValueError, match="5-d pools must lead with a stage axis of 1"):
        paged_decode_attention_write(qkv, cos, sin, jnp.stack([k_pool] * 2), jnp.stack([v_pool] * 2), table, pos,
                                     slots)
    out, k5, v5 = paged_decode_attention_write(qkv, cos, sin, k_pool[None], v_pool[None], table, pos,
                                               slots)  # the runner's per-device pools, stage axis kept
    assert k5.shape == (1, *k_pool.shape) and v5.shape == (1, *v_pool.shape)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(paged_decode_attention_write(
        qkv, cos, sin, k_pool, v_pool, table, pos, slots)[0]))
