"""Profile reading: a `jax.profiler` trace of compiled steps -> time per model region, named from the HLO.

A trace names each XLA op it timed (`ffi_call.67`, `wrapped_scatter.3`) and the module it ran in; the optimised
HLO of that module says what the op is (`op_name` metadata: the Flax module path, e.g.
`DecoderLayer/attention/attn/attn._packed_qkv/ffi_call`, and a custom call's target). Pure functions of the trace
events and the HLO text: no JAX, no clocks.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_MODULE = re.compile(r"^HloModule (\S+?),")
_OP = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Region:
    """Time one label took per step: `ms` summed over its ops, `ops` of them per step."""

    label: str
    ms: float
    ops: float


def op_labels(hlo_texts: Iterable[str]) -> dict[tuple[str, str], str]:
    """(module, op) -> label for every op with `op_name` metadata in these HLO modules.

    The label is the op_name without its `jit(...)/` frames (a fusion's op_name joins its parts' with `;`, each
    with its own), so the same layer part in every layer gets the same label; a custom call's target follows in
    brackets.
    """
    labels: dict[tuple[str, str], str] = {}
    for text in hlo_texts:
        lines = text.splitlines()
        header = _MODULE.match(lines[0]) if lines else None
        if header is None:
            raise ValueError("not an HLO module: the text does not start with 'HloModule <name>,'")
        module = header.group(1)
        for line in lines[1:]:
            op, name = _OP.match(line), _OP_NAME.search(line)
            if op is None or name is None:
                continue
            label = re.sub(r"(^|;)jit\([^)]*\)/", r"\1", name.group(1))
            target = _TARGET.search(line)
            labels[(module, op.group(1))] = f"{label} [{target.group(1)}]" if target else label
    return labels


def load_trace(directory: str | Path) -> list[dict[str, Any]]:
    """The complete ('X') events of the newest perfetto trace `jax.profiler` wrote under `directory`
    (`create_perfetto_trace=True`)."""
    paths = sorted(Path(directory).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory}: was the trace started with "
                                "create_perfetto_trace=True?")
    with gzip.open(paths[-1]) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def regions(events: Iterable[Mapping[str, Any]], labels: Mapping[tuple[str, str], str],
            module: str) -> tuple[float, list[Region]]:
    """(ms per run, regions by time, largest first) of `module`'s runs in the trace.

    A run is one execution (`run_id`); its time is from its first op's start to its last op's end. Ops the HLO
    does not label are grouped by their name without the numeric suffix. An op inside a control-flow op (`cond`,
    `while`) is timed in both, so such regions overlap.
    """
    per_label: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    spans: dict[str, list[float]] = {}
    for e in events:
        args = e.get("args", {})
        op = args.get("hlo_op")
        if args.get("hlo_module") != module or op is None:
            continue
        label = labels.get((module, op), re.sub(r"\.\d+$", "", op))
        per_label[label] += e["dur"]
        count[label] += 1
        span = spans.setdefault(args.get("run_id", ""), [e["ts"], e["ts"] + e["dur"]])
        span[0], span[1] = min(span[0], e["ts"]), max(span[1], e["ts"] + e["dur"])
    if not spans:
        raise ValueError(f"the trace holds no op of module {module!r}")
    runs = len(spans)
    step_ms = sum(end - start for start, end in spans.values()) / runs / 1e3
    found = [Region(label, total / runs / 1e3, count[label] / runs) for label, total in per_label.items()]
    return step_ms, sorted(found, key=lambda r: -r.ms)
