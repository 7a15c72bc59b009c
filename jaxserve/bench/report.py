"""Benchmark statistics: per-request records -> throughput, latency percentiles and goodput; text and JSON reports.

Pure functions of the records (numpy only; no gRPC, no clocks). Latencies are reported in milliseconds; percentiles
interpolate linearly between order statistics (numpy's default), so p50 of [1, 2, 3, 4] is 2.5.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxserve.bench.driver import LoadResult, RequestRecord

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of a sample."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Iterable[float]) -> Distribution | None:
        """The distribution of `samples`; None when there are none."""
        a = np.asarray(list(samples), np.float64)
        if a.size == 0:
            return None
        p50, p90, p99 = (float(v) for v in np.percentile(a, PERCENTILES))
        return cls(int(a.size), float(a.mean()), p50, p90, p99, float(a.min()), float(a.max()))


@dataclasses.dataclass(frozen=True)
class SLO:
    """Latency targets of goodput; an unset target constrains nothing."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def is_set(self) -> bool:
        """Whether any target is given (goodput is reported only then)."""
        return self.ttft_ms is not None or self.tpot_ms is not None

    def is_met_by(self, record: RequestRecord) -> bool:
        """Whether a request completed within every target (a one-token reply has no TPOT, so meets that one)."""
        if not record.is_ok:
            return False
        if self.ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1e3 > self.ttft_ms):
            return False
        tpot = record.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms


@dataclasses.dataclass(frozen=True)
class Summary:
    """Aggregates of one run. Throughputs count completed requests only; latencies are in milliseconds."""

    num_requests: int
    completed: int
    failed: int
    failures: dict[str, int]  # gRPC status name (or SKIPPED) -> requests
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens of completed requests / s
    input_throughput: float  # prompt tokens of completed requests / s
    total_output_tokens: int
    total_prompt_tokens: int
    cached_prompt_tokens: dict[str, int]  # prompt tokens served from the server's KV cache, by tier
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2e_ms: Distribution | None
    slo: SLO
    goodput: float | None  # completed requests meeting the SLO / s; None when no SLO is set
    slo_attainment: float | None  # fraction of all requests meeting the SLO


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: SLO = SLO()) -> Summary:
    """Throughput, latency distributions and goodput of `records` over a run of `duration_s` seconds."""
    done = [r for r in records if r.is_ok]
    failures = collections.Counter(r.status for r in records if not r.is_ok)
    per_s = 1.0 / duration_s if duration_s > 0 else math.nan
    met = sum(slo.is_met_by(r) for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    cached: collections.Counter[str] = collections.Counter()
    for r in done:
        cached.update(r.cached_tokens)
    return Summary(
        num_requests=len(records), completed=len(done), failed=len(records) - len(done),
        failures=dict(sorted(failures.items())), duration_s=duration_s, request_throughput=len(done) * per_s,
        output_throughput=output_tokens * per_s, input_throughput=prompt_tokens * per_s,
        total_output_tokens=output_tokens, total_prompt_tokens=prompt_tokens,
        cached_prompt_tokens={t: cached[t] for t in ("device", "host", "disk")},
        ttft_ms=Distribution.of(r.ttft_s * 1e3 for r in done if r.ttft_s is not None),
        tpot_ms=Distribution.of(t * 1e3 for r in done if (t := r.tpot_s) is not None),
        itl_ms=Distribution.of(g * 1e3 for r in done for g in r.itl_s),
        e2e_ms=Distribution.of(r.e2e_s * 1e3 for r in done if r.e2e_s is not None),
        slo=slo, goodput=met * per_s if slo.is_set else None,
        slo_attainment=met / len(records) if slo.is_set and records else None)


def _number(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_summary(summary: Summary, title: str = "Serving benchmark") -> str:
    """A fixed-width text report of `summary`."""
    s = summary
    width = 60
    lines = [f" {title} ".center(width, "=")]

    def row(label: str, value: str) -> None:
        lines.append(f"{label:<40}{value:>20}")

    row("Requests completed / failed", f"{s.completed} / {s.failed}")
    if s.failures:
        lines.append("  failures: " + ", ".join(f"{k} x{v}" for k, v in s.failures.items()))
    row("Duration (s)", _number(s.duration_s))
    row("Request throughput (req/s)", _number(s.request_throughput))
    row("Output token throughput (tok/s)", _number(s.output_throughput))
    row("Input token throughput (tok/s)", _number(s.input_throughput))
    row("Output / prompt tokens", f"{s.total_output_tokens} / {s.total_prompt_tokens}")
    cached = sum(s.cached_prompt_tokens.values())
    row("Prompt tokens from the KV cache", f"{cached / s.total_prompt_tokens:.1%}" if s.total_prompt_tokens else "-")
    if cached:
        lines.append("  by tier: " + ", ".join(f"{t} {n}" for t, n in s.cached_prompt_tokens.items()))
    if s.goodput is not None:
        targets = ", ".join(t for t in (f"TTFT <= {s.slo.ttft_ms:g} ms" if s.slo.ttft_ms is not None else "",
                                        f"TPOT <= {s.slo.tpot_ms:g} ms" if s.slo.tpot_ms is not None else "") if t)
        row("Goodput (req/s)", _number(s.goodput))
        row("SLO attainment", f"{s.slo_attainment:.1%}" if s.slo_attainment is not None else "-")
        lines.append(f"  SLO: {targets}")
    lines.append(" latency (ms) ".center(width, "-"))
    lines.append(f"{'':<8}{'mean':>13}{'p50':>13}{'p90':>13}{'p99':>13}")
    for name, d in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)):
        values = (d.mean, d.p50, d.p90, d.p99) if d is not None else (None,) * 4
        lines.append(f"{name:<8}" + "".join(f"{_number(v):>13}" for v in values))
    lines.append("=" * width)
    return "\n".join(lines)


def _record_json(record: RequestRecord) -> dict[str, Any]:
    out = dataclasses.asdict(record)
    out["tpot_s"] = record.tpot_s
    return out


def result_json(result: LoadResult, summary: Summary, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The full result as JSON-ready data: `meta` (what was run), `summary`, and every request's record."""
    return {"meta": dict(meta), "summary": dataclasses.asdict(summary),
            "requests": [_record_json(r) for r in result.records]}


def write_json(path: str, data: Mapping[str, Any]) -> None:
    """Writes `data` as indented JSON (NaN written as null), creating the parent directory."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(data), f, indent=1)
        f.write("\n")


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
