"""What the hierarchical prefix cache buys: TTFT of one long prompt served cold and from each KV tier, and a
multi-turn workload served with the cache off and on. One invocation, one runner, one set of random weights.

Part 1, `ttft` (one Engine driven in-process, no gRPC; `runner.warmup=false`, a host tier big enough for a prompt,
a disk tier in a fresh directory under `--disk_dir`):
  - a compile pass, untimed: one throwaway prompt of `--prompt_len` tokens goes through every path (cold, device
    hit, host hit, disk hit), so every bucket used later (prefill chunks, decode, page copies) is compiled;
  - then for each of `--repeats` fresh random prompts P: cold (first sight of P), device hit (P again),
    `evict_cache("device")` and a host hit, `evict_cache("host")` and a disk hit.
  TTFT is submit to first token as the engine's sink sees it (time.perf_counter). Each run of P must report its tier
  in `usage` (a hit serves every full page but the one holding the last prompt token) and the four runs must
  generate the same greedy ids, or the script fails. Before each disk hit the page files are synced and dropped
  from the OS page cache (`posix_fadvise(DONTNEED)`, `--drop_page_cache`), so the disk row reads the storage
  device (on a VM, whatever its virtual disk caches below that) rather than pages the kernel still holds in memory.

Part 2, `multiturn` (the gRPC server started in-process on 127.0.0.1, driven by the `jaxserve-bench` driver): the
same seeded workload, `--conversations` conversations at once sharing one `--system_len`-id system prompt, `--turns`
turns each in order, each turn the whole conversation so far plus `--input_len` new ids, `--output_len` tokens
generated (EOS ignored), served with `cache.prefix_caching=false` and then with the cache on (the config's tiers:
host DRAM, and no disk unless `--set cache.disk_path=...`). Both servers run over the runner of part 1.
Compilation stays out of both measurements: `--serving_warmup=all` compiles every bucket once before the first
server; `pass` (quicker, for smoke runs) sends each server an untimed, differently seeded workload of the same shape
first, which may leave a bucket or two to compile inside the run (the `compiles` column says how many).

    python benchmarks/prefix_cache.py                                  # 2048-token prompt x3; 8 conversations x 4
    python benchmarks/prefix_cache.py --json_out prefix_cache.json
    python benchmarks/prefix_cache.py --prompt_len 256 --repeats 1 --conversations 2 --turns 2 --system_len 128 \
        --output_len 4 --serving_warmup pass                           # a smoke run (about a minute)
    python benchmarks/prefix_cache.py --config configs/tiny.toml --prompt_len 200 --repeats 1 --conversations 2 \
        --turns 2 --system_len 64 --input_len uniform:8:16 --output_len 4  # a smoke run on the tiny model

Measure on a quiet machine (see benchmarks/README.md): the numbers are latencies of a CPU that must be idle.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
from absl import app, flags

from jaxserve.bench.driver import Connection, LoadResult, LoadSpec, run_load
from jaxserve.bench.report import Summary, summarize, write_json
from jaxserve.bench.workload import LengthDistribution, Vocabulary, Workload, multiturn_workload
from jaxserve.config import Config, load_config, to_dict
from jaxserve.engine import Engine, Request, RequestOutput
from jaxserve.kv.pages import pages_for
from jaxserve.outputs import Usage
from jaxserve.replica import Replica, build_replica
from jaxserve.sequence import SamplingOptions
from jaxserve.server.app import BackgroundServer, Server

PARTS = ("ttft", "multiturn")
TIERS = ("cold", "device", "host", "disk")
# The targets on the 2-core development CPU at 2k-token prompts: TTFT cold / TTFT of a hit from this tier.
TARGETS = {"device": 10.0, "host": 5.0}
# Ids below this are reserved (padding, BOS, EOS in the bench configs); random prompts avoid them.
FIRST_ORDINARY_ID = 3
TIMEOUT_S = 1800.0

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/bench-110m.toml", "jaxserve config of the model (random weights unless it "
                    "names a checkpoint).")
flags.DEFINE_multi_string("set", [], "Overrides of --config, section.field=value; the script's own overrides of "
                          "each part (cache switches, warm-up, ports) come after them.")
flags.DEFINE_list("parts", list(PARTS), f"Which of {', '.join(PARTS)} to run.")
flags.DEFINE_integer("seed", 0, "Seed of the prompts and the workload.")
flags.DEFINE_integer("prompt_len", 2048, "ttft: tokens of the long prompt.")
flags.DEFINE_integer("repeats", 3, "ttft: fresh prompts, each timed cold and from every tier.")
flags.DEFINE_integer("max_tokens", 4, "ttft: tokens generated per request (greedy, EOS ignored); the ids are "
                     "compared across tiers.")
flags.DEFINE_bool("drop_page_cache", True, "ttft: before each disk hit, sync the page files and drop them from the "
                  "OS page cache, so disk hits read the device.")
flags.DEFINE_string("disk_dir", None, "ttft: where the disk tier's temporary directory goes (default: the system's "
                    "temporary directory); removed at the end.")
flags.DEFINE_integer("conversations", 8, "multiturn: conversations, all in flight at once.")
flags.DEFINE_integer("turns", 4, "multiturn: turns per conversation, sent in order.")
flags.DEFINE_integer("system_len", 1024, "multiturn: ids of the system prompt every conversation starts with.")
flags.DEFINE_string("input_len", "uniform:32:128", "multiturn: new ids per turn: N, uniform:MIN:MAX or "
                    "normal:MEAN:STD.")
flags.DEFINE_string("output_len", "32", "multiturn: tokens generated per turn (EOS ignored), same forms.")
flags.DEFINE_enum("serving_warmup", "all", ["all", "pass"], "multiturn: `all` compiles every bucket before the "
                  "first server; `pass` sends each server an untimed workload of the same shape (another seed).")
flags.DEFINE_bool("progress", True, "multiturn: progress bars.")
flags.DEFINE_string("json_out", None, "Write every number, the flags and the configs used here.")


# ----- part 1: TTFT per tier -----


class Stream:
    """One request's outputs as its engine sink receives them (on the engine thread): when the first token came,
    every token, and the final output."""

    def __init__(self) -> None:
        self.first_token_at: float | None = None
        self.token_ids: list[int] = []
        self.final: RequestOutput | None = None
        self._done = threading.Event()

    def sink(self, out: RequestOutput) -> None:
        """The engine's callback; must not block."""
        if out.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.token_ids += out.token_ids
        if out.finish_reason is not None:
            self.final = out
            self._done.set()

    def wait(self, timeout: float) -> RequestOutput:
        """The final output, once the request has finished; raises if it failed or did not finish in time."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no final output within {timeout} s")
        assert self.final is not None
        if self.final.finish_reason != "length" or self.final.usage is None or self.first_token_at is None:
            raise RuntimeError(f"request {self.final.request_id} ended with {self.final.finish_reason!r}: "
                               f"{self.final.error}")
        return self.final


@dataclasses.dataclass
class Probe:
    """One timed request of part 1: prompt `repeat` (-1: the compile pass) served from `tier`."""

    repeat: int
    tier: str
    ttft_s: float
    cached_tokens: int
    cached_by_tier: dict[str, int]
    output_ids: list[int]
    compiles: int  # compilations while it ran; 0 unless the compile pass missed a bucket


def _cached_by_tier(usage: Usage) -> dict[str, int]:
    return {"device": usage.cached_device, "host": usage.cached_host, "disk": usage.cached_disk}


def drop_page_cache(directory: str) -> int:
    """Syncs every file under `directory` and asks the kernel to drop its cached pages (no root needed; dirty pages
    are only dropped once written, hence the sync). Returns the number of files."""
    count = 0
    for root, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            count += 1
    return count


def probe_tiers(engine: Engine, prompt: list[int], repeat: int, max_tokens: int) -> list[Probe]:
    """Serves `prompt` cold, then from the device, the host and the disk tier (evicting the tiers above in between),
    and checks that each run was served from where it should have been and that all four generated the same ids.

    The prompt must be new to the engine. A hit covers every full page before the one holding the last prompt token
    (that token is always computed, since its step samples the first output token).
    """
    page_size = engine.config.cache.page_size
    expected = (len(prompt) - 1) // page_size * page_size
    probes = []
    for tier in TIERS:
        if tier == "host":
            engine.evict_cache("device", timeout=TIMEOUT_S)
        elif tier == "disk":
            engine.evict_cache("host", timeout=TIMEOUT_S)
            if FLAGS.drop_page_cache:
                drop_page_cache(engine.config.cache.disk_path)
        stream = Stream()
        compiles = engine.runner.compile_count
        start = time.perf_counter()
        engine.submit(Request(f"p{repeat}-{tier}", prompt, SamplingOptions(max_tokens=max_tokens, ignore_eos=True)),
                      stream.sink)
        final = stream.wait(TIMEOUT_S)
        assert final.usage is not None and stream.first_token_at is not None
        cached = _cached_by_tier(final.usage)
        want = {t: expected if t == tier else 0 for t in cached}
        if cached != want or final.usage.cached_tokens != sum(want.values()):
            raise RuntimeError(f"prompt {repeat}, {tier} run: expected cached tokens {want}, the engine reported "
                               f"{final.usage} (is the tier big enough, or did a page fail to load?)")
        probes.append(Probe(repeat, tier, stream.first_token_at - start, final.usage.cached_tokens, cached,
                            stream.token_ids, engine.runner.compile_count - compiles))
    cold = probes[0].output_ids
    for p in probes[1:]:
        if p.output_ids != cold:
            raise RuntimeError(f"prompt {repeat}: the {p.tier} hit generated {p.output_ids}, the cold run {cold}; "
                               "a cached page's KV differs from the KV it replaced")
    return probes


@dataclasses.dataclass(frozen=True)
class TierRow:
    """Part 1's result for one tier over every repeat."""

    tier: str
    ttft_median_ms: float
    ttft_min_ms: float
    cached_tokens: int
    speedup_vs_cold: float  # cold median / this tier's median


def tier_rows(probes: list[Probe]) -> list[TierRow]:
    """Median and min TTFT per tier, and the speedup over cold (timed probes only)."""
    medians = {t: float(np.median([p.ttft_s for p in probes if p.tier == t])) for t in TIERS}
    return [TierRow(t, medians[t] * 1e3, min(p.ttft_s for p in probes if p.tier == t) * 1e3,
                    next(p.cached_tokens for p in probes if p.tier == t), medians["cold"] / medians[t])
            for t in TIERS]


def format_tiers(rows: list[TierRow]) -> str:
    """Part 1's table."""
    header = f"{'tier':<8}{'TTFT median ms':>16}{'TTFT min ms':>13}{'cached tokens':>15}{'speedup vs cold':>17}"
    lines = [header, "-" * len(header)]
    lines += [f"{r.tier:<8}{r.ttft_median_ms:>16.1f}{r.ttft_min_ms:>13.1f}{r.cached_tokens:>15}"
              f"{r.speedup_vs_cold:>16.1f}x" for r in rows]
    return "\n".join(lines)


def run_ttft(replica: Replica, base_overrides: list[str], disk_path: str) -> dict[str, Any]:
    """Part 1 on one engine over `replica`; returns its JSON-ready results (and prints its table)."""
    runner = replica.runner
    prompt_len, max_tokens = FLAGS.prompt_len, FLAGS.max_tokens
    base = replica.config
    # The host tier must hold the prompt's pages at once, or the host hit would find some of them spilled to disk.
    host_bytes = max(base.cache.host_bytes, 2 * pages_for(prompt_len + max_tokens, base.cache.page_size)
                     * runner.page_bytes)
    overrides = [*base_overrides, "cache.prefix_caching=true", f"cache.host_bytes={host_bytes}",
                 f"cache.disk_path='{disk_path}'"]
    config = load_config(FLAGS.config, overrides)
    rng = np.random.default_rng(FLAGS.seed)
    vocab = config.model.vocab_size

    def fresh_prompt() -> list[int]:
        return rng.integers(FIRST_ORDINARY_ID, vocab, size=prompt_len).tolist()

    engine = Engine(config, runner, replica.tokenizer)
    engine.start()
    try:
        start, compiles = time.perf_counter(), runner.compile_count
        probe_tiers(engine, fresh_prompt(), -1, max_tokens)
        print(f"ttft: compile pass {time.perf_counter() - start:.1f} s "
              f"({runner.compile_count - compiles} steps and copies compiled)", flush=True)
        probes: list[Probe] = []
        for repeat in range(FLAGS.repeats):
            probes += probe_tiers(engine, fresh_prompt(), repeat, max_tokens)
            print("ttft: prompt {}: {}".format(repeat, ", ".join(
                f"{p.tier} {p.ttft_s * 1e3:.1f} ms" for p in probes[-len(TIERS):])), flush=True)
    finally:
        engine.shutdown(TIMEOUT_S)
    rows = tier_rows(probes)
    speedups = {r.tier: r.speedup_vs_cold for r in rows}
    targets = {t: {"target": x, "speedup": speedups[t], "met": speedups[t] >= x} for t, x in TARGETS.items()}
    compiles = sum(p.compiles for p in probes)

    print(f"\nTTFT of a {prompt_len}-token prompt by where its KV came from ({config.model.name}, "
          f"{FLAGS.repeats} prompt{'s' if FLAGS.repeats > 1 else ''}, page_size {config.cache.page_size}, "
          f"{max_tokens} tokens generated, greedy ids identical across tiers; disk pages "
          f"{'dropped from' if FLAGS.drop_page_cache else 'left in'} the OS page cache)")
    print(format_tiers(rows))
    for t, v in targets.items():
        print(f"target (the issue's, for 2k-token prompts on bench-110m): {t} hit >= {v['target']:g}x lower TTFT "
              f"than cold: {'met' if v['met'] else 'NOT met'} ({v['speedup']:.1f}x)")
    if compiles:
        print(f"warning: {compiles} compilations inside timed requests; the compile pass missed a bucket")
    return {"prompt_len": prompt_len, "repeats": FLAGS.repeats, "max_tokens": max_tokens,
            "drop_page_cache": FLAGS.drop_page_cache, "host_bytes": host_bytes, "overrides": overrides,
            "compiles_during_timed_requests": compiles,
            "tiers": [dataclasses.asdict(r) for r in rows], "targets": targets,
            "probes": [dataclasses.asdict(p) for p in probes]}


# ----- part 2: multi-turn, cache off vs on -----


@dataclasses.dataclass
class ServingRun:
    """One server's measured run of the workload."""

    name: str  # "off" or "on"
    overrides: list[str]
    result: LoadResult
    summary: Summary
    compiles: int  # compilations during the measured run


def longest_sequence(workload: Workload) -> int:
    """Tokens of the longest sequence the workload makes (its last turn's prompt plus its reply)."""
    longest = 0
    for c in workload.conversations:
        n = len(c.system)
        for t in c.turns:
            n += len(t.content) + (t.max_tokens or 0)
            longest = max(longest, n)
    return longest


def serve_workload(name: str, replica: Replica, overrides: list[str], workload: Workload,
                   warmup: Workload | None) -> ServingRun:
    """Starts a server over the shared runner, sends it `warmup` untimed (if any), then times `workload`."""
    config = load_config(FLAGS.config, overrides)
    spec = LoadSpec(ignore_eos=True)
    server = BackgroundServer(Server(config, Engine(config, replica.runner, replica.tokenizer), replica.tokenizer))
    server.start(timeout=TIMEOUT_S)
    try:
        if warmup is not None:
            run_load(Connection(server.target), warmup, spec, progress=False)
        compiles = replica.runner.compile_count
        result = run_load(Connection(server.target), workload, spec, progress=FLAGS.progress)
        compiles = replica.runner.compile_count - compiles
    finally:
        server.stop(timeout=TIMEOUT_S)
    summary = summarize(result.records, result.duration_s)
    if summary.failed:
        raise RuntimeError(f"cache {name}: {summary.failed} of {summary.num_requests} requests failed: "
                           f"{summary.failures}; first error: {next(r.error for r in result.records if not r.is_ok)}")
    return ServingRun(name, overrides, result, summary, compiles)


def _cached_fraction(s: Summary) -> float:
    return sum(s.cached_prompt_tokens.values()) / s.total_prompt_tokens if s.total_prompt_tokens else float("nan")


def format_serving(runs: list[ServingRun]) -> str:
    """Part 2's table."""
    header = (f"{'cache':<7}{'done':>6}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'out tok/s':>11}{'cached':>9}"
              f"{'device/host/disk tokens':>25}{'compiles':>10}")
    lines = [header, "-" * len(header)]
    for run in runs:
        s = run.summary
        p50, p99 = (s.ttft_ms.p50, s.ttft_ms.p99) if s.ttft_ms else (float("nan"),) * 2
        tiers = "/".join(str(s.cached_prompt_tokens[t]) for t in ("device", "host", "disk"))
        lines.append(f"{run.name:<7}{s.completed:>6}{p50:>13.0f}{p99:>13.0f}{s.output_throughput:>11.1f}"
                     f"{_cached_fraction(s):>9.1%}{tiers:>25}{run.compiles:>10}")
    return "\n".join(lines)


def run_multiturn(replica: Replica, base_overrides: list[str]) -> dict[str, Any]:
    """Part 2: the workload through a cache-off server, then a cache-on one; returns its JSON-ready results."""
    m, runner = replica.config.model, replica.runner
    vocab = Vocabulary(m.vocab_size, (*m.eos_token_ids, *([m.bos_token_id] if m.bos_token_id >= 0 else [])))
    try:
        input_len, output_len = LengthDistribution.parse(FLAGS.input_len), LengthDistribution.parse(FLAGS.output_len)
        workloads = [multiturn_workload(FLAGS.conversations * FLAGS.turns, FLAGS.turns, FLAGS.system_len, input_len,
                                        output_len, vocab, seed) for seed in (FLAGS.seed, FLAGS.seed + 1)]
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    workload, warmup_workload = workloads
    longest = max(longest_sequence(w) for w in workloads)
    if longest > replica.config.runner.max_seq_len:
        raise app.UsageError(f"multiturn: a conversation reaches {longest} tokens, over runner.max_seq_len="
                             f"{replica.config.runner.max_seq_len}")
    print(f"\nmultiturn: {workload.num_requests} requests of {workload.name}", flush=True)
    warmup_s = 0.0
    if FLAGS.serving_warmup == "all":
        start, compiles = time.perf_counter(), runner.compile_count
        runner.warmup()
        warmup_s = time.perf_counter() - start
        print(f"multiturn: compiled every bucket in {warmup_s:.1f} s ({runner.compile_count - compiles} new)",
              flush=True)
    serving = [*base_overrides, "server.host='127.0.0.1'", "server.port=0", "server.metrics_port=0"]
    runs = [serve_workload(name, replica, [*serving, f"cache.prefix_caching={switch}"], workload,
                           warmup_workload if FLAGS.serving_warmup == "pass" else None)
            for name, switch in (("off", "false"), ("on", "true"))]
    off, on = runs
    if sum(off.summary.cached_prompt_tokens.values()):
        raise RuntimeError(f"cache off served prompt tokens from a cache: {off.summary.cached_prompt_tokens}")
    if FLAGS.turns > 1 and not sum(on.summary.cached_prompt_tokens.values()):
        raise RuntimeError("cache on served no prompt token from the cache on a multi-turn workload")
    same = sum(a.output_ids == b.output_ids for a, b in zip(off.result.records, on.result.records, strict=True))
    ttft_ratio = (off.summary.ttft_ms.p50 / on.summary.ttft_ms.p50
                  if off.summary.ttft_ms and on.summary.ttft_ms else float("nan"))
    tps_ratio = (on.summary.output_throughput / off.summary.output_throughput
                 if off.summary.output_throughput else float("nan"))

    print(f"\nMulti-turn workload, prefix cache off vs on ({m.name}, {FLAGS.conversations} conversations at once x "
          f"{FLAGS.turns} turns, system prompt {FLAGS.system_len} ids, new ids {input_len}, output {output_len}; "
          f"warm-up: {FLAGS.serving_warmup})")
    print(format_serving(runs))
    print(f"TTFT p50 off/on: {ttft_ratio:.2f}x    output tok/s on/off: {tps_ratio:.2f}x    "
          f"identical greedy replies: {same}/{workload.num_requests}")
    if off.compiles or on.compiles:
        print("warning: compilations inside a measured run (see the compiles column); --serving_warmup=all "
              "excludes them")
    return {"workload": workload.name, "num_requests": workload.num_requests, "serving_warmup": FLAGS.serving_warmup,
            "warmup_s": warmup_s, "longest_sequence": longest, "ttft_p50_off_over_on": ttft_ratio,
            "output_tps_on_over_off": tps_ratio, "identical_replies": same,
            **{run.name: {"overrides": run.overrides, "compiles_during_run": run.compiles,
                          "cached_fraction": _cached_fraction(run.summary),
                          "summary": dataclasses.asdict(run.summary),
                          "requests": [dataclasses.asdict(r) for r in run.result.records]} for run in runs}}


# ----- entry point -----


def _check_flags(config: Config, parts: list[str]) -> None:
    if "ttft" in parts:
        ps = config.cache.page_size
        if FLAGS.prompt_len <= ps:
            raise app.UsageError(f"--prompt_len must exceed cache.page_size={ps} for any page to be cached")
        if FLAGS.prompt_len + FLAGS.max_tokens > config.runner.max_seq_len:
            raise app.UsageError(f"--prompt_len + --max_tokens = {FLAGS.prompt_len + FLAGS.max_tokens} exceeds "
                                 f"runner.max_seq_len={config.runner.max_seq_len}")
        if FLAGS.repeats < 1 or FLAGS.max_tokens < 1:
            raise app.UsageError("--repeats and --max_tokens must be >= 1")
        if FIRST_ORDINARY_ID >= config.model.vocab_size:
            raise app.UsageError(f"model.vocab_size={config.model.vocab_size} leaves no ordinary ids for prompts")
    if "multiturn" in parts and (FLAGS.conversations < 1 or FLAGS.turns < 1 or FLAGS.system_len < 0):
        raise app.UsageError("--conversations and --turns must be >= 1, --system_len >= 0")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    unknown = sorted(set(FLAGS.parts) - set(PARTS))
    if unknown:
        raise app.UsageError(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    parts = [p for p in PARTS if p in FLAGS.parts]
    # The script decides when compilation happens (a compile pass, or --serving_warmup), never the replica build.
    base_overrides = [*FLAGS.set, "runner.warmup=false"]
    config = load_config(FLAGS.config, base_overrides)
    _check_flags(config, parts)
    print(f"{config.model.name} ({FLAGS.config}); parts: {', '.join(parts)}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (measure on a quiet machine)", flush=True)

    start = time.perf_counter()
    replica = build_replica(config)
    print(f"built the replica in {time.perf_counter() - start:.1f} s ({replica.runner.page_bytes / 1024:.1f} KiB "
          "per KV page)", flush=True)
    results: dict[str, Any] = {}
    if "ttft" in parts:
        disk_path = tempfile.mkdtemp(prefix="prefix_cache_disk_", dir=FLAGS.disk_dir)
        try:
            results["ttft"] = run_ttft(replica, base_overrides, disk_path)
        finally:
            shutil.rmtree(disk_path, ignore_errors=True)
    if "multiturn" in parts:
        results["multiturn"] = run_multiturn(replica, base_overrides)

    if FLAGS.json_out:
        meta = {"config": FLAGS.config, "overrides": FLAGS.set, "resolved_config": to_dict(config),
                "model": config.model.name, "parts": parts, "seed": FLAGS.seed,
                "flags": {f: getattr(FLAGS, f) for f in ("prompt_len", "repeats", "max_tokens", "drop_page_cache",
                                                          "disk_dir", "conversations", "turns", "system_len",
                                                          "input_len", "output_len", "serving_warmup")},
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": sys.version.split()[0]},
                "load_average": os.getloadavg()}
        write_json(FLAGS.json_out, {"meta": meta, **results})
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    app.run(main)
