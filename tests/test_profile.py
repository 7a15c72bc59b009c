"""Profile reading (jaxserve/bench/profile.py): labels from HLO text, and regions of a real traced decode step."""

from __future__ import annotations

import collections

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
    jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
    try:
        for _ in range(3):
            np.asarray(runner.decode(batch).token)
    finally:
        jax.profiler.stop_trace()
    events = [e for e in load_trace(tmp_path) if e.get("args", {}).get("hlo_module") == "jit__step"]
    labels = op_labels(runner.hlo_texts())
    step_ms, found = regions(events, labels, "jit__step")
    assert step_ms > 0
    assert sum(r.ms for r in found) <= step_ms * 1.01  # ops of one run do not overlap on its thread
    # Each traced run executes the same schedule, and the trace's op names are the HLO's: all but a few ops XLA
    # adds without metadata (wrapped broadcasts and the like) get their module path. Counted, not timed, so that
    # other work in the process cannot fail it.
    per_run = collections.Counter(e["args"]["run_id"] for e in events)
    assert len(per_run) == 3 and len(set(per_run.values())) == 1
    labelled = sum(("jit__step", e["args"]["hlo_op"]) in labels for e in events)
    assert labelled >= 0.8 * len(events)
    by_label = {r.label: r for r in found}
    if runner.cpu_kernels:  # one call of each kernel per layer per step
        for region in ("attention/attn/ffi_call [jaxserve_paged_decode_attention_write]",
                       "attention/attn/attn._packed_qkv/ffi_call [jaxserve_packed_matmul]",
                       "attention/attn/o_proj/ffi_call [jaxserve_packed_matmul]",
                       "mlp/mlp/ffi_call [jaxserve_packed_matmul]",
                       "mlp/mlp/down_proj/ffi_call [jaxserve_packed_matmul]"):
            assert by_label[f"DecoderLayer/{region}"].ops == config.model.num_layers
    assert any(label.startswith("DecoderLayer/mlp/") for label in by_label)
