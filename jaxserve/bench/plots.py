"""PNG plots of a benchmark run: latency CDFs and throughput over time. Needs matplotlib (`pip install
'jaxserve[plots]'`); without it `write_plots` raises PlotsUnavailableError saying so. No statistics of its own."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxserve.bench.driver import RequestRecord

INSTALL_HINT = "pip install 'jaxserve[plots]' (or pip install matplotlib)"


class PlotsUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():  # noqa: ANN202 (matplotlib.pyplot, which may be absent)
    try:
        import matplotlib
    except ImportError as e:
        raise PlotsUnavailableError(f"plots need matplotlib, which is not installed: {INSTALL_HINT}") from e
    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def write_plots(records: Sequence[RequestRecord], plot_dir: str, title: str = "") -> list[str]:
    """Writes latency_cdf.png (TTFT, TPOT, ITL, E2E) and throughput.png (output tok/s and mean requests in flight,
    per second) into `plot_dir`; returns their paths."""
    plt = _pyplot()
    os.makedirs(plot_dir, exist_ok=True)
    done = [r for r in records if r.is_ok]
    paths = [os.path.join(plot_dir, "latency_cdf.png"), os.path.join(plot_dir, "throughput.png")]

    metrics = {
        "TTFT": [r.ttft_s * 1e3 for r in done if r.ttft_s is not None],
        "TPOT": [t * 1e3 for r in done if (t := r.tpot_s) is not None],
        "ITL": [g * 1e3 for r in done for g in r.itl_s],
        "E2E": [r.e2e_s * 1e3 for r in done if r.e2e_s is not None],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, metrics.items(), strict=True):
        if values:
            x = np.sort(values)
            ax.plot(x, np.arange(1, x.size + 1) / x.size)
            for p in (50, 90, 99):
                ax.axvline(np.percentile(x, p), color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency CDFs {title}".strip())
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    token_times = np.array([t for r in done for t in r.token_times_s()])
    end = max([r.start_s + (r.e2e_s or 0.0) for r in records] + [1e-9])
    edges = np.arange(0.0, end + 1.0, 1.0)
    tokens_per_s, _ = np.histogram(token_times, edges)
    starts = np.array([r.start_s for r in records if r.e2e_s is not None])[:, None]  # [requests, 1]
    ends = np.array([r.start_s + r.e2e_s for r in records if r.e2e_s is not None])[:, None]
    # Mean requests in flight over each 1 s bin: every request's overlap with the bin, summed.
    overlap = np.minimum(ends, edges[None, 1:]) - np.maximum(starts, edges[None, :-1])  # [requests, bins]
    in_flight = np.clip(overlap, 0.0, None).sum(axis=0)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.step(edges[:-1], tokens_per_s, where="post", label="output tok/s")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens / s")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.step(edges[:-1], in_flight, where="post", color="tab:orange", label="requests in flight (mean)")
    ax2.set_ylabel("requests in flight")
    fig.legend(loc="upper left", bbox_to_anchor=(0, 1), bbox_transform=ax.transAxes)
    fig.suptitle(f"Throughput over time {title}".strip())
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
