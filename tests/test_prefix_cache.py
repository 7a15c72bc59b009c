"""The hierarchical KV cache through the engine on the tiny model: greedy outputs are identical with the cache off
and after device, host and disk hits, after swap preemption, after a restart on the same disk directory and with
a corrupted disk page; under memory pressure with shared prefixes and cancellations every page is conserved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from engine_harness import Collector, started_engine

from jaxserve.config import load_config
from jaxserve.engine import Engine, Request, RequestOutput
from jaxserve.generate import GenerationOptions, generate
from jaxserve.runner import Runner
from jaxserve.sequence import SamplingOptions

SYSTEM = [256, *range(40, 90)]  # a 51-token shared prefix: 6 full pages of 8


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(load_config("configs/tiny.toml", ["runner.warmup=false"]))


def _reference(runner: Runner, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy outputs straight from the runner, no engine and no cache."""
    out = []
    for i in range(0, len(prompts), runner.config.runner.max_batch):
        batch = prompts[i: i + runner.config.runner.max_batch]
        out += generate(runner, batch, [GenerationOptions(max_tokens=max_tokens)] * len(batch))
    return out


def _run(engine: Engine, rid: str, prompt: list[int], max_tokens: int = 12) -> tuple[Collector, RequestOutput]:
    got = Collector()
    engine.submit(Request(rid, prompt, SamplingOptions(max_tokens=max_tokens, ignore_eos=True)), got.sink)
    got.wait(1)
    final = got.final(rid)
    assert final.finish_reason == "length", final.error
    return got, final


def test_greedy_outputs_are_identical_cache_off_and_after_device_host_and_disk_hits(runner: Runner,
                                                                                    tmp_path: Path) -> None:
    prompts = {name: SYSTEM + [ord(c) for c in f"{name}, and why?"] for name in ("off", "a", "dev", "host", "disk")}
    want = dict(zip(prompts, _reference(runner, list(prompts.values()), 12), strict=True))

    off = started_engine(runner, "cache.prefix_caching=false", "cache.host_bytes=0")
    for name in ("off", "a"):
        got, final = _run(off, name, prompts[name])
        assert got.tokens(name) == want[name] and final.usage.cached_tokens == 0
    assert off.shutdown(5)

    engine = started_engine(runner, f"cache.disk_path='{tmp_path}'")
    got, final = _run(engine, "a", prompts["a"])
    assert got.tokens("a") == want["a"] and final.usage.cached_tokens == 0
    got, final = _run(engine, "dev", prompts["dev"])
    assert got.tokens("dev") == want["dev"]
    assert (final.usage.cached_tokens, final.usage.cached_device) == (48, 48)
    engine.evict_cache("device")
    got, final = _run(engine, "host", prompts["host"])
    assert got.tokens("host") == want["host"]
    assert (final.usage.cached_tokens, final.usage.cached_host) == (48, 48)
    engine.evict_cache("host")
    got, final = _run(engine, "disk", prompts["disk"])
    assert got.tokens("disk") == want["disk"]
    assert (final.usage.cached_tokens, final.usage.cached_disk) == (48, 48)
    m = engine.metrics
    assert m.prefix_cache_hit_tokens.labels("disk")._value.get() == 48
    assert m.kv_onloaded_bytes.labels("host")._value.get() == 6 * runner.page_bytes
    assert m.kv_offloaded_bytes.labels("disk")._value.get() >= 6 * runner.page_bytes
    assert engine.shutdown(5)


def test_a_restart_on_the_same_disk_directory_reuses_its_pages(runner: Runner, tmp_path: Path) -> None:
    prompt = SYSTEM + [1, 2, 3]
    want = _reference(runner, [prompt], 10)[0]
    first = started_engine(runner, f"cache.disk_path='{tmp_path}'")
    _run(first, "a", prompt, 10)
    assert first.shutdown(5)  # persists the cached pages to disk
    assert len(list(tmp_path.rglob("*.kvpage"))) >= 6
    second = started_engine(runner, f"cache.disk_path='{tmp_path}'")
    got, final = _run(second, "b", prompt, 10)
    assert got.tokens("b") == want and final.usage.cached_disk == 48
    assert second.shutdown(5)


def test_a_corrupted_disk_page_is_a_miss_and_the_output_stays_right(runner: Runner, tmp_path: Path) -> None:
    prompt = SYSTEM + [7, 7, 7]
    want = _reference(runner, [prompt], 10)[0]
    engine = started_engine(runner, f"cache.disk_path='{tmp_path}'")
    got, first = _run(engine, "a", prompt, 10)
    engine.evict_cache("host")
    for path in tmp_path.rglob("*.kvpage"):
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01  # one flipped bit in the middle of every page's KV
        path.write_bytes(bytes(raw))
    got, final = _run(engine, "b", prompt, 10)
    assert got.tokens("b") == want and final.usage.cached_tokens == 0
    engine.cache.report()
    assert engine.metrics.kv_corrupt_pages._value.get() >= 1
    assert engine.shutdown(5)


@pytest.mark.parametrize("preemption", ["swap", "recompute"])
def test_memory_pressure_with_shared_prefixes_and_cancellations_conserves_pages(runner: Runner, tmp_path: Path,
                                                                              preemption: str) -> None:
    rng = np.random.RandomState(3)
    systems = [SYSTEM, [256, *range(100, 140)], [256, *range(150, 170)]]
    prompts = [list(systems[rng.randint(3)]) + list(rng.randint(0, 256, rng.randint(1, 40))) for _ in range(100)]
    want = _reference(runner, prompts, 24)
    # 20 pages of 8 tokens hold about two sequences; the host tier holds 12 pages, the disk the rest.
    engine = started_engine(runner, "cache.num_pages=21", f"cache.host_bytes={12 * runner.page_bytes}",
                     f"cache.disk_path='{tmp_path}'", f"cache.disk_bytes={200 * runner.page_bytes}",
                     f"engine.preemption={preemption}", "engine.swap_min_tokens=0", "engine.max_waiting=200")
    got = Collector()
    cancel = set(rng.choice(100, 15, replace=False).tolist())
    for i, p in enumerate(prompts):
        engine.submit(Request(str(i), p, SamplingOptions(max_tokens=24, ignore_eos=True)), got.sink)
        if i in cancel:
            engine.cancel(str(i))
    got.wait(100)
    assert engine.wait_idle(5)
    engine.evict_cache("device")  # also a round trip on the loop thread: the last step's bookkeeping is done
    engine.cache.check_invariants()
    assert engine.allocator.num_used == 0
    assert engine.metrics.preemptions._value.get() > 0
    hits = engine.metrics.prefix_cache_hit_tokens
    assert hits.labels("device")._value.get() > 0 and hits.labels("host")._value.get() > 0
    for i in range(100):
        final = got.final(str(i))
        if final.finish_reason == "cancelled":
            assert i in cancel
            continue
        assert final.finish_reason == "length"
        assert got.tokens(str(i)) == want[i], f"request {i}"
    assert engine.shutdown(5)
