"""Asynchronous scheduling (engine.async_scheduling): the same outputs as running each step to completion, with
decode tokens fed on the device, prefix-cache keys intact, and failures that fail only what they touch."""

from __future__ import annotations

import numpy as np
import pytest
from engine_harness import Collector, started_engine

from jaxserve import engine as engine_module
from jaxserve.config import load_config
from jaxserve.engine import Request
from jaxserve.generate import GenerationOptions, generate
from jaxserve.kv.cache import KVCache
from jaxserve.kv.pages import PageAllocator
from jaxserve.runner import Runner
from jaxserve.scheduler import Scheduler, SchedulerConfig
from jaxserve.sequence import PENDING, SamplingOptions, Sequence
from jaxserve.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(load_config("configs/tiny.toml", ["runner.warmup=false"]))


def _workload(runner: Runner, seed: int, count: int) -> list[tuple[list[int], SamplingOptions]]:
    """Prompts of many lengths with every stopping rule and sampling mode; stop tokens and strings are taken from
    the greedy continuation, so that they are hit mid-stream."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(count):
        prompt = [256, *rng.randint(0, 256, rng.randint(1, 60))]
        kind = i % 5
        stop_ids, stop = (), ()
        if kind in (2, 3):
            greedy = generate(runner, [prompt], [GenerationOptions(max_tokens=12)])[0]
            if kind == 2:
                stop_ids = (greedy[4],)
            else:
                stop = (ByteTokenizer().decode(greedy[5:7]),)
        opts = SamplingOptions(
            max_tokens=int(rng.randint(8, 30)), temperature=0.8 if kind in (1, 4) else 0.0,
            top_k=20 if kind == 4 else 0, seed=i, stop_token_ids=stop_ids, stop=stop,
            logprobs=2 if kind in (0, 4) else 0, ignore_eos=kind != 1)
        out.append((prompt, opts))
    return out


def _serve(runner: Runner, work: list[tuple[list[int], SamplingOptions]], *overrides: str) -> Collector:
    engine, got = started_engine(runner, "engine.max_waiting=1000", *overrides), Collector()
    for i, (prompt, opts) in enumerate(work):
        engine.submit(Request(str(i), prompt, opts), got.sink)
    got.wait(len(work))
    assert engine.shutdown(5)
    assert engine.allocator.num_used == 0
    runner.reset_cache()
    return got


@pytest.mark.parametrize("overrides", [(), ("cache.num_pages=24",)], ids=["roomy", "preempting"])
def test_async_scheduling_gives_exactly_the_outputs_of_synchronous_steps(runner: Runner, overrides: tuple) -> None:
    work = _workload(runner, 0, 40)
    sync = _serve(runner, work, "engine.async_scheduling=false", *overrides)
    overlapped = _serve(runner, work, *overrides)
    for i in range(len(work)):
        a, b = sync.outputs[str(i)], overlapped.outputs[str(i)]
        assert [o.token_ids for o in b] == [o.token_ids for o in a], f"request {i}"
        assert overlapped.text(str(i)) == sync.text(str(i))
        assert (b[-1].finish_reason, b[-1].usage) == (a[-1].finish_reason, a[-1].usage)
        np.testing.assert_allclose([lp.logprob for o in b for lp in o.logprobs],
                                   [lp.logprob for o in a for lp in o.logprobs], rtol=1e-5)
    reasons = [sync.final(str(i)).finish_reason for i in range(len(work))]
    assert reasons.count("stop") >= len(work) // 5 and "length" in reasons  # stop tokens and strings were hit


def test_steady_decode_steps_take_their_input_tokens_on_the_device(runner: Runner,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    feeds = {"fed": 0, "host": 0}
    original = runner.decode

    def counting(batch, feed=None):  # noqa: ANN001, ANN202
        feeds["fed" if feed is not None else "host"] += 1
        return original(batch, feed)

    monkeypatch.setattr(runner, "decode", counting)
    work = [([256, *range(i, i + 10)], SamplingOptions(max_tokens=30, ignore_eos=True)) for i in range(4)]
    _serve(runner, work)
    assert feeds["fed"] > 0 and feeds["host"] == 0  # even a prompt's first decode row is fed by its prefill
    feeds.update(fed=0, host=0)
    _serve(runner, work, "engine.async_scheduling=false")
    assert feeds["fed"] == 0 and feeds["host"] > 0


def test_a_returning_conversation_hits_the_same_cached_pages_with_and_without_overlap(runner: Runner) -> None:
    # Pages completed by a token that was still being sampled are keyed once it is known: the follow-up prompt
    # (the first prompt, its answer, a new turn) finds every full page of them in the cache.
    first = [256, *range(30, 61)]
    hits = {}
    for mode in ("true", "false"):
        engine, got = started_engine(runner, f"engine.async_scheduling={mode}"), Collector()
        engine.submit(Request("a", first, SamplingOptions(max_tokens=37, ignore_eos=True)), got.sink)
        got.wait(1)
        follow = first + got.tokens("a") + [7, 8, 9]
        engine.submit(Request("b", follow, SamplingOptions(max_tokens=2, ignore_eos=True)), got.sink)
        got.wait(2)
        assert engine.shutdown(5)
        hits[mode] = got.final("b").usage.cached_tokens
        runner.reset_cache()
    page = runner.config.cache.page_size
    assert hits["true"] == hits["false"] == (len(first) + 37 - 1) // page * page


def test_a_step_that_fails_on_the_device_fails_its_requests_and_the_step_fed_by_it(
        runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = engine_module.jax.device_get

    def failing_once(x):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected device failure")
        return original(x)

    monkeypatch.setattr(engine_module.jax, "device_get", failing_once)
    engine, got = started_engine(runner), Collector()
    for i in range(3):
        engine.submit(Request(str(i), [256, *range(i, i + 9)], SamplingOptions(max_tokens=20, ignore_eos=True)),
                      got.sink)
    got.wait(3)
    monkeypatch.setattr(engine_module.jax, "device_get", original)
    for i in range(3):
        assert got.final(str(i)).finish_reason == "error"
        assert "injected device failure" in got.final(str(i)).error
    # The engine keeps serving afterwards, and every page came back.
    engine.submit(Request("after", [256, 1, 2, 3], SamplingOptions(max_tokens=5, ignore_eos=True)), got.sink)
    got.wait(4)
    assert got.final("after").finish_reason == "length" and len(got.tokens("after")) == 5
    assert engine.shutdown(5)
    assert engine.allocator.num_used == 0
    assert engine.metrics.step_failures._value.get() == 1


def test_pending_placeholders_resolve_in_order_and_drop_when_the_sequence_ends() -> None:
    seq = Sequence("s", [1, 2, 3], SamplingOptions(max_tokens=5))
    first, second = seq.append_pending(), seq.append_pending()
    assert (seq.num_tokens, seq.num_known_tokens, seq.output_token_ids) == (5, 3, [PENDING, PENDING])
    seq.resolve(first, 42)
    assert (seq.num_known_tokens, seq.token_ids) == (4, [1, 2, 3, 42, PENDING])
    with pytest.raises(ValueError, match="not pending"):
        seq.resolve(first, 43)
    seq.drop_pending()  # the sequence stopped at 42: the token being sampled after it is discarded
    assert (seq.output_token_ids, seq.num_pending, second) == ([42], 0, 1)


def test_a_sequence_whose_pending_token_is_its_last_gets_no_decode_row() -> None:
    cache = KVCache(PageAllocator(16, 4))
    scheduler = Scheduler(SchedulerConfig(max_batch=4, max_step_tokens=64, max_chunk=64, max_seq_len=64))
    ending = Sequence("ending", [1, 2, 3], SamplingOptions(max_tokens=2))
    going = Sequence("going", [1, 2, 3], SamplingOptions(max_tokens=5))
    running = scheduler.plan([ending, going], [], cache).running  # both prefill their prompts
    ending.append_token(9)  # its first output is known and was decoded (a step still running samples the 2nd)
    running = scheduler.plan([], running, cache).running
    ending.append_pending()  # that step's placeholders
    going.append_pending()
    plan = scheduler.plan([], running, cache)
    assert [c.seq.request_id for c in plan.decode] == ["going"]  # "ending"'s 2nd token is its last
    assert not ending.is_finished and ending in plan.running  # finished by the engine when that token arrives
