"""Profile reading (jaxserve/bench/profile.py): labels from HLO text, and regions of a real traced decode step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve.bench.profile import load_trace, op_labels, regions
from jaxserve.config import load_config
from jaxserve.runner import Runner, StepBatch

HLO = "\n".join([
    "HloModule jit__step, is_scheduled=true, entry_computation_layout={(f32[2,4]{1,0})->f32[2,4]{1,0}}",
    "",
    "ENTRY %main (p: f32[2,4]) -> f32[2,4] {",
    "  %p = f32[2,4]{1,0} parameter(0)",
    '  %ffi_call.3 = f32[2,4]{1,0} custom-call(%p), custom_call_target="jaxserve_packed_matmul", '
    'metadata={op_name="jit(_step)/DecoderLayer/mlp/ffi_call"}',
    '  ROOT %add.1 = f32[2,4]{1,0} add(%ffi_call.3, %p), '
    'metadata={op_name="jit(_step)/DecoderLayer/add;jit(_step)/x/add"}',
    "}",
])


def _event(op: str, ts: float, dur: float, run: str, module: str = "jit__step") -> dict:
    return {"ph": "X", "name": op, "ts": ts, "dur": dur,
            "args": {"hlo_module": module, "hlo_op": op, "run_id": run}}


def test_labels_are_module_paths_without_the_jit_frame_and_name_a_custom_calls_target() -> None:
    labels = op_labels([HLO])
    assert labels == {("jit__step", "ffi_call.3"): "DecoderLayer/mlp/ffi_call [jaxserve_packed_matmul]",
                      ("jit__step", "add.1"): "DecoderLayer/add;x/add"}
    with pytest.raises(ValueError, match="not an HLO module"):
        op_labels(["ENTRY %main () -> f32[] {}"])


def test_regions_sum_each_label_per_run_and_group_unlabelled_ops_by_name() -> None:
    events = [_event("ffi_call.3", 0, 600, "a"), _event("add.1", 700, 100, "a"), _event("copy.7", 800, 200, "a"),
              _event("ffi_call.3", 5000, 400, "b"), _event("copy.9", 5400, 100, "b"),
              _event("ffi_call.3", 0, 9000, "c", module="jit_other")]
    step_ms, found = regions(events, op_labels([HLO]), "jit__step")
    assert step_ms == pytest.approx((1.0 + 0.5) / 2)  # run a spans 0-1000 us, run b 5000-5500 us
    by_label = {r.label: r for r in found}
    assert by_label["DecoderLayer/mlp/ffi_call [jaxserve_packed_matmul]"].ms == pytest.approx(0.5)
    assert by_label["copy"].ms == pytest.approx(0.15) and by_label["copy"].ops == 1
    assert found[0].label.startswith("DecoderLayer/mlp")  # largest first
    with pytest.raises(ValueError, match="no op of module"):
        regions(events, {}, "jit_absent")


def test_a_traced_decode_step_is_split_into_the_models_regions(tmp_path) -> None:
    config = load_config("configs/tiny.toml", ["runner.warmup=false", "runner.batch_buckets=[2]"])
    runner = Runner(config)
    ps = config.cache.page_size
    zeros_f, zeros_i = np.zeros(2, np.float32), np.zeros(2, np.int32)
    batch = StepBatch(np.full((2, 1), 7, np.int32), np.zeros((2, 1), np.int32), np.asarray([[ps], [2 * ps]], np.int32),
                      np.asarray([[1], [2]], np.int32), zeros_i, zeros_f, zeros_i, np.ones(2, np.float32),
                      np.zeros(2, np.uint32))
    np.asarray(runner.decode(batch).token)  # compiles outside the trace
    # The labelled ops, not the gaps between them, hold the time: in a quiet process nearly all of it. Other work
    # in the process (a test's engine threads winding down) can stretch the gaps of one trace, hence three tries.
    for attempt in range(3):
        trace_dir = tmp_path / str(attempt)
        jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
        try:
            for _ in range(3):
                np.asarray(runner.decode(batch).token)
        finally:
            jax.profiler.stop_trace()
        step_ms, found = regions(load_trace(trace_dir), op_labels(runner.hlo_texts()), "jit__step")
        assert step_ms > 0
        assert sum(r.ms for r in found) <= step_ms * 1.01  # ops of one run do not overlap on its thread
        if sum(r.ms for r in found) >= step_ms * 0.5:
            break
    assert sum(r.ms for r in found) >= step_ms * 0.5
    by_label = {r.label: r for r in found}
    attention = by_label.get("DecoderLayer/attention/attn/ffi_call [jaxserve_paged_decode_attention_write]")
    if runner.cpu_kernels:
        assert attention is not None and attention.ops == config.model.num_layers  # one call per layer per step
    assert any(label.startswith("DecoderLayer/mlp/") for label in by_label)
