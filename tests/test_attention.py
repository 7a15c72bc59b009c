"""models/attention.py against a dense reference: paged prefill chunks and paged decode give the attention of the
unpaged sequence, over scattered pages, grouped queries, a sliding window and padding rows; decode on both of its
paths (all pages gathered at once, and the loop over page columns)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from models import attention
from models.attention import paged_attention, write_kv


def _dense(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, window: int) -> np.ndarray:
    """q [T, Hkv, G, D] at positions q_pos over one sequence's keys and values [S, Hkv, D]; float64."""
    scores = np.einsum("tkgd,skd->tkgs", q, k) / np.sqrt(q.shape[-1])
    key_pos = np.arange(k.shape[0])
    allowed = key_pos[None, :] <= q_pos[:, None]
    if window:
        allowed &= key_pos[None, :] > q_pos[:, None] - window
    scores = np.where(allowed[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("tkgs,skd->tkgd", probs, v)


@pytest.mark.parametrize("decode_path", ["gathered", "looped"])
@pytest.mark.parametrize("window", [0, 11])
@pytest.mark.parametrize(("kv_heads", "groups"), [(2, 1), (2, 3)])
@pytest.mark.parametrize("chunk", [1, 5])
def test_paged_attention_equals_dense_attention(window: int, kv_heads: int, groups: int, chunk: int,
                                                decode_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if decode_path == "looped":
        if chunk > 1:
            pytest.skip("only decode has two paths")
        monkeypatch.setattr(attention, "DECODE_GATHER_LIMIT", 0)
    rng = np.random.RandomState(kv_heads * 10 + groups + chunk)
    page_size, d, num_pages = 4, 8, 40
    lengths = [23, 9, 30]  # tokens already in each row's context before this chunk
    tables = rng.choice(np.arange(1, num_pages), (len(lengths), 9), replace=False)  # scattered, disjoint pages
    keys = [rng.randn(n + chunk, kv_heads, d) for n in lengths]
    values = [rng.randn(n + chunk, kv_heads, d) for n in lengths]
    k_pool = jnp.zeros((num_pages, kv_heads, page_size, d), jnp.float32)
    v_pool = jnp.zeros_like(k_pool)
    rows = len(lengths) + 1  # plus a padding row
    positions = np.full((rows, chunk), -1, np.int32)
    slots = np.zeros((rows, chunk), np.int32)
    table = np.zeros((rows, 9), np.int32)
    for r, n in enumerate(lengths):
        table[r] = tables[r]
        pos = np.arange(n + chunk)
        all_slots = (tables[r][pos // page_size] * page_size + pos % page_size).astype(np.int32)
        k_pool = write_kv(k_pool, jnp.asarray(keys[r][None, :n], jnp.float32), jnp.asarray(all_slots[None, :n]))
        v_pool = write_kv(v_pool, jnp.asarray(values[r][None, :n], jnp.float32), jnp.asarray(all_slots[None, :n]))
        positions[r] = pos[n:]
        slots[r] = all_slots[n:]
    new_k = np.zeros((rows, chunk, kv_heads, d), np.float32)
    new_v = np.zeros_like(new_k)
    for r, n in enumerate(lengths):
        new_k[r], new_v[r] = keys[r][n:], values[r][n:]
    k_pool = write_kv(k_pool, jnp.asarray(new_k), jnp.asarray(slots))
    v_pool = write_kv(v_pool, jnp.asarray(new_v), jnp.asarray(slots))
    q = rng.randn(rows, chunk, kv_heads, groups, d).astype(np.float32)
    got = np.asarray(paged_attention(jnp.asarray(q), k_pool, v_pool, jnp.asarray(table), jnp.asarray(positions),
                                     window))
    for r in range(len(lengths)):
        want = _dense(q[r].astype(np.float64), keys[r], values[r], positions[r], window)
        np.testing.assert_allclose(got[r], want, atol=2e-5, rtol=1e-5)
    assert np.all(np.isfinite(got))
