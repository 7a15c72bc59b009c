"""The CPU matmul kernel and the runner on the CPU kernels: same numbers as XLA's dot and the pure-JAX runner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_runner import _prefill_batch

from jaxserve.config import load_config
from jaxserve.generate import GenerationOptions, generate
from jaxserve.kernels import build
from jaxserve.kernels.matmul import pack, pack_swiglu, packed_matmul, streams, tile
from jaxserve.parallel.mesh import make_mesh
from jaxserve.runner import Runner, StepBatch, use_cpu_kernels
from models.llama import live_tokens, pack_projections

pytestmark = pytest.mark.skipif(not build.available(), reason=f"CPU kernels unavailable: {build.unavailable_reason()}")


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize(("k", "n"), [(64, 64), (48, 100), (256, 272), (33, 130), (3, 50)])
def test_packed_matmul_equals_a_float64_product(rows: int, k: int, n: int) -> None:
    rng = np.random.default_rng(rows * 1000 + k + n)
    x, w = rng.standard_normal((rows, k), np.float32), rng.standard_normal((k, n), np.float32)
    got = np.asarray(jax.jit(packed_matmul, static_argnums=2)(jnp.asarray(x), pack(jnp.asarray(w)), n))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (rows, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 8, 13])
def test_packed_matmul_splits_a_wide_product_over_the_pool(rows: int) -> None:
    """Enough ~128 KB pieces of panels (and a K that leaves the last run short) that every pool thread takes pieces
    from its own range and, done early, from the back of another's: every column is still computed exactly once."""
    rng = np.random.default_rng(rows)
    x, w = rng.standard_normal((rows, 1030), np.float32), rng.standard_normal((1030, 3001), np.float32)
    got = np.asarray(jax.jit(packed_matmul, static_argnums=2)(jnp.asarray(x), pack(jnp.asarray(w)), 3001))
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_packed_matmul_keeps_leading_dims_and_runs_a_prefill_sized_chunk() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 256, 96), np.float32), rng.standard_normal((96, 200), np.float32)
    got = np.asarray(packed_matmul(jnp.asarray(x), pack(jnp.asarray(w)), 200))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("live", [0, 5, 8, 17, 40, 99])
def test_packed_matmul_computes_only_live_rows_and_zeros_the_padding(live: int) -> None:
    rng = np.random.default_rng(live)
    x, w = rng.standard_normal((40, 96), np.float32), rng.standard_normal((96, 130), np.float32)
    got = np.asarray(jax.jit(packed_matmul, static_argnums=2)(jnp.asarray(x), pack(jnp.asarray(w)), 130,
                                                               jnp.int32(live)))
    kept = min(live, 40)  # a count past the rows is clamped
    np.testing.assert_allclose(got[:kept], x[:kept].astype(np.float64) @ w, rtol=1e-5, atol=1e-4)
    assert not got[kept:].any()


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize(("k", "n"), [(64, 48), (48, 100), (33, 130), (3, 50)])
def test_swiglu_matmul_equals_silu_of_gate_times_up_in_float64(rows: int, k: int, n: int) -> None:
    rng = np.random.default_rng(rows * 1000 + k + n)
    x, gate, up = (rng.standard_normal(s, np.float32) for s in ((rows, k), (k, n), (k, n)))
    live = max(rows - 1, 1)  # the last row is padding
    packed = pack_swiglu(jnp.asarray(gate), jnp.asarray(up))
    got = np.asarray(jax.jit(packed_matmul, static_argnums=(2, 4))(jnp.asarray(x), packed, n, jnp.int32(live), True))
    g, u = x[:live].astype(np.float64) @ gate, x[:live].astype(np.float64) @ up
    want = g / (1 + np.exp(-g)) * u
    assert got.shape == (rows, n)
    np.testing.assert_allclose(got[:live], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not got[live:].any()


def _rms_norm64(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("rows", [1, 8, 9, 40])
@pytest.mark.parametrize(("k", "n", "swiglu"), [(64, 48, False), (768, 130, False), (33, 100, True), (96, 50, True)])
def test_packed_matmul_with_norm_and_residual_equals_the_float64_block(rows: int, k: int, n: int,
                                                                       swiglu: bool) -> None:
    """RMSNorm folded in front and a residual added behind: padding rows come back as their residual rows."""
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = 3.0 * rng.standard_normal((rows, k), np.float32)
    scale = rng.uniform(0.5, 1.5, k).astype(np.float32)
    gate, up = rng.standard_normal((k, n), np.float32), rng.standard_normal((k, n), np.float32)
    residual = rng.standard_normal((rows, n), np.float32)
    live = max(rows - 2, 1)
    packed = pack_swiglu(jnp.asarray(gate), jnp.asarray(up)) if swiglu else pack(jnp.asarray(gate))

    def run(norm: bool, add: bool) -> np.ndarray:
        return np.asarray(jax.jit(lambda *a: packed_matmul(
            a[0], a[1], n, a[2], swiglu, a[3] if norm else None, 1e-5, a[4] if add else None))(
                jnp.asarray(x), packed, jnp.int32(live), jnp.asarray(scale), jnp.asarray(residual)))

    h = _rms_norm64(x[:live], scale, 1e-5)
    g = h @ gate
    prod = g / (1 + np.exp(-g)) * (h @ up) if swiglu else g
    tol = 1e-5 * np.abs(prod).max()
    both, norm_only, add_only = run(True, True), run(True, False), run(False, True)
    np.testing.assert_allclose(both[:live], prod + residual[:live], rtol=1e-5, atol=tol)
    np.testing.assert_array_equal(both[live:], residual[live:])
    np.testing.assert_allclose(norm_only[:live], prod, rtol=1e-5, atol=tol)
    assert not norm_only[live:].any()
    plain = x[:live].astype(np.float64) @ gate
    plain = plain / (1 + np.exp(-plain)) * (x[:live].astype(np.float64) @ up) if swiglu else plain
    np.testing.assert_allclose(add_only[:live], plain + residual[:live], rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    np.testing.assert_array_equal(add_only[live:], residual[live:])


def test_packed_matmul_refuses_a_norm_scale_or_residual_of_the_wrong_shape() -> None:
    packed, x = pack(jnp.ones((8, 96), jnp.float32)), jnp.ones((2, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"norm_scale has shape \(7,\), expected \(8,\)"):
        packed_matmul(x, packed, 96, norm_scale=jnp.ones((7,)))
    with pytest.raises(ValueError, match=r"residual has shape \(2, 95\), expected \(2, 96\)"):
        packed_matmul(x, packed, 96, residual=jnp.ones((2, 95)))


def test_pack_swiglu_interleaves_gate_and_up_panels() -> None:
    gate, up = (np.arange(4 * 70, dtype=np.float32).reshape(4, 70) + b for b in (0, 1000))
    packed = np.asarray(pack_swiglu(jnp.asarray(gate), jnp.asarray(up)))
    assert packed.shape == (streams(), 2 * -(-70 // tile()), -(-4 // streams()), tile())
    np.testing.assert_array_equal(packed[:, 0::2], np.asarray(pack(jnp.asarray(gate))))
    np.testing.assert_array_equal(packed[:, 1::2], np.asarray(pack(jnp.asarray(up))))


@pytest.mark.parametrize(("over", "swiglu"), [(1, False), (-1, False), (1, True), (None, False)])
def test_packed_matmul_refuses_an_n_its_panels_do_not_hold(over: int | None, swiglu: bool) -> None:
    """Two panels hold n in (tile, 2 * tile], or (0, tile] as a SwiGLU pair: one column past either end fails."""
    packed = pack(jnp.ones((8, 2 * tile()), jnp.float32))
    top = tile() if swiglu else 2 * tile()
    n = 0 if over is None else (top + 1 if over > 0 else top - tile())
    with pytest.raises(ValueError, match=f"n={n} does not fit"):
        packed_matmul(jnp.ones((2, 8), jnp.float32), packed, n, swiglu=swiglu)


def test_packed_matmul_refuses_panels_of_another_width_run_count_or_run_length() -> None:
    x, runs = jnp.ones((2, 8), jnp.float32), streams()
    for shape in ((runs, 1, -(-8 // runs), tile() + 8), (runs + 1, 1, -(-8 // (runs + 1)), tile())):
        with pytest.raises(ValueError, match=f"{shape[0]} runs of panels of {shape[3]} columns, but this host's "
                                             f"kernels take {runs} of {tile()}"):
            packed_matmul(x, jnp.ones(shape, jnp.float32), tile())
    longer = 8 + runs  # packed for K + runs: runs one row longer than K=8 takes, whatever the run count
    with pytest.raises(ValueError, match=f"runs of {-(-longer // runs)} rows do not split K=8 into {runs}"):
        packed_matmul(x, pack(jnp.ones((longer, tile()), jnp.float32)), tile())


def test_pack_projections_fuses_qkv_and_gate_up_and_keeps_biases() -> None:
    layer = {"input_norm": {"scale": "s1"},
             "attn": {name: {"kernel": name, "bias": f"{name} bias"} for name in ("q_proj", "k_proj", "v_proj")}
             | {"o_proj": {"kernel": "o_proj"}},
             "mlp": {name: {"kernel": name} for name in ("gate_proj", "up_proj", "down_proj")}}
    packed = pack_projections(layer, lambda kernels, n_in, swiglu: (tuple(kernels), n_in, swiglu))
    assert packed == {
        "input_norm": {"scale": "s1"},
        "attn": {"qkv_proj": {"packed": (("q_proj", "k_proj", "v_proj"), 1, False)},
                 "q_proj": {"bias": "q_proj bias"}, "k_proj": {"bias": "k_proj bias"},
                 "v_proj": {"bias": "v_proj bias"}, "o_proj": {"packed": (("o_proj",), 2, False)}},
        "mlp": {"gate_up_proj": {"packed": (("gate_proj", "up_proj"), 1, True)},
                "down_proj": {"packed": (("down_proj",), 1, False)}},
    }


@pytest.mark.parametrize(("positions", "want"), [
    ([[0, 1, 2, -1]], 3),                  # a prefill chunk padded at the end
    ([[7], [3], [-1], [-1]], 2),           # a decode batch padded to its bucket
    ([[0, 1, -1], [0, -1, -1]], 4),        # interior padding is kept: only the tail is cut
    ([[-1, -1]], 0),
])
def test_live_tokens_counts_up_to_the_last_real_token(positions: list, want: int) -> None:
    assert int(live_tokens(jnp.array(positions, jnp.int32))) == want


def test_pack_lays_columns_out_in_zero_padded_panels() -> None:
    w = np.arange(5 * 70, dtype=np.float32).reshape(5, 70)
    packed = np.asarray(pack(jnp.asarray(w)))
    width, runs = tile(), streams()
    kq = -(-5 // runs)
    assert packed.shape == (runs, -(-70 // width), kq, width)
    for col in (0, width - 1, width, 69):  # column c lives in panel c // width at lane c % width
        for row in range(5):  # row k in run k // kq at k % kq
            assert packed[row // kq, col // width, row % kq, col % width] == w[row, col]
    full = packed.transpose(0, 2, 1, 3).reshape(runs * kq, -1)  # [K padded, N padded] again
    np.testing.assert_array_equal(full[:5, :70], w)
    assert not full[5:].any() and not full[:, 70:].any()  # padding rows and columns are zero


def test_a_failing_compiler_is_an_error_naming_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JAXSERVE_KERNEL_CACHE", str(tmp_path))
    script = tmp_path / "broken-cxx"
    script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\necho 'error: no' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(RuntimeError, match="failed \\(3\\)"):
        build._build(str(script))
    assert not list(tmp_path.glob("*.so"))  # no half-built library left behind


def _runner(kernels: str, *overrides: str) -> Runner:
    return Runner(load_config("configs/tiny.toml", ["runner.warmup=false", f"runner.cpu_kernels={kernels}",
                                                    *overrides]))


@pytest.mark.parametrize(("tensor", "pipeline", "bias"), [(1, 1, False), (2, 2, False), (4, 1, False), (2, 1, True)])
def test_runner_on_the_kernels_gives_the_pure_jax_logits(tensor: int, pipeline: int, bias: bool) -> None:
    # Biases (Qwen2) ride beside the fused q/k/v matmul, on each device's slice of the heads.
    mesh = (f"mesh.tensor={tensor}", f"mesh.pipeline={pipeline}", f"model.attention_bias={str(bias).lower()}")
    on, off = _runner("on", *mesh), _runner("off", *mesh)
    assert on.cpu_kernels and not off.cpu_kernels
    ps = on.config.cache.page_size
    prompt = np.random.RandomState(3).randint(0, 256, 37).tolist()
    table = np.array([5, 2, 9, 14, 11, 20], np.int32)  # scattered pages, 8 tokens each
    for runner in (on, off):
        runner.logits(_prefill_batch(np.array(prompt), 0, table, ps))
    for i, token in enumerate([3, 250, 17]):  # decode steps on the cached prompt
        got = on.logits(_prefill_batch(np.array([token]), 37 + i, table, ps), decode=True)
        want = off.logits(_prefill_batch(np.array([token]), 37 + i, table, ps), decode=True)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pipeline", [1, 2])
def test_a_decode_step_on_the_kernels_updates_the_pools_without_copying_them(pipeline: int) -> None:
    """The attention kernel writes into the donated pools in place: no op of the compiled decode step produces a
    whole pool (XLA copied every pool before the call when it was handed a squeeze of the pool, ~35x the step)."""
    runner = _runner("on", f"mesh.pipeline={pipeline}")
    ps = runner.config.cache.page_size
    table = np.array([5, 2, 9], np.int32)
    runner.prefill(_prefill_batch(np.arange(20) % 256, 0, table, ps))
    runner.logits(_prefill_batch(np.array([7]), 20, table, ps), decode=True)
    page_dims = ",".join(map(str, runner.kv[0][0].shape[-3:]))  # [Hkv, page_size, D] of one page
    decode = [t for t in runner.hlo_texts() if "jaxserve_paged_decode_attention_write" in t]
    assert decode
    pool_copies = [line for t in decode for line in t.splitlines()
                   if f"{page_dims}]" in line.split("=", 1)[-1].split("(", 1)[0]
                   and ("copy(" in line or "copy_fusion" in line.split("=", 1)[0] or "fusion(" in line)]
    assert not pool_copies, pool_copies[:3]


def test_a_padded_decode_batch_samples_what_the_pure_jax_runner_samples() -> None:
    """Three rows in a bucket of four: the kernels skip the padding row and the real rows are unchanged."""
    on, off = _runner("on"), _runner("off")
    ps = on.config.cache.page_size
    tables = [np.array([5, 2, 9], np.int32), np.array([14, 11, 20], np.int32), np.array([1, 3, 4], np.int32)]
    lengths = [17, 9, 22]
    rng = np.random.RandomState(5)
    for table, n in zip(tables, lengths, strict=True):
        prompt = rng.randint(0, 256, n)
        for runner in (on, off):
            runner.prefill(_prefill_batch(prompt, 0, table, ps))
    pos = np.array([[n] for n in lengths], np.int32)
    slots = np.array([[t[n // ps] * ps + n % ps] for t, n in zip(tables, lengths, strict=True)], np.int32)
    batch = StepBatch(np.array([[3], [250], [17]], np.int32), pos, slots, np.stack(tables), np.zeros(3, np.int32),
                      np.zeros(3, np.float32), np.zeros(3, np.int32), np.ones(3, np.float32), np.zeros(3, np.uint32),
                      np.full(3, 5, np.int32))
    got, want = jax.device_get(on.decode(batch)), jax.device_get(off.decode(batch))
    np.testing.assert_array_equal(got.token[:3], want.token[:3])
    np.testing.assert_allclose(got.logprob[:3], want.logprob[:3], atol=1e-4)
    np.testing.assert_allclose(got.top_logprobs[:3], want.top_logprobs[:3], atol=1e-4)
    assert got.top_logprobs[:3].any()


def test_greedy_generation_is_the_same_with_and_without_the_kernels() -> None:
    prompts = [[256, 72, 101, 108, 108, 111], [256, *range(40, 77)]]
    options = [GenerationOptions(max_tokens=12)] * len(prompts)
    assert generate(_runner("on"), prompts, options) == generate(_runner("off"), prompts, options)


def test_cpu_kernels_on_refuses_a_model_they_cannot_run() -> None:
    config = load_config("configs/tiny.toml", ["runner.cpu_kernels=on", "model.dtype=bfloat16"])
    mesh = make_mesh(config.mesh)
    with pytest.raises(ValueError, match="float32 only.*bfloat16"):
        use_cpu_kernels(config, mesh)
    assert not use_cpu_kernels(load_config("configs/tiny.toml", ["model.dtype=bfloat16"]), mesh)
    assert not use_cpu_kernels(load_config("configs/tiny.toml", ["runner.cpu_kernels=off"]), mesh)
