"""The engine loop on the tiny model: continuous batching is exact, cancellation frees pages, stops work."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from engine_harness import Collector, started_engine

from jaxserve.config import load_config
from jaxserve.engine import Engine, QueueFullError, Request, RequestOutput
from jaxserve.generate import GenerationOptions, generate
from jaxserve.runner import Runner
from jaxserve.sequence import SamplingOptions
from jaxserve.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(load_config("configs/tiny.toml", ["runner.warmup=false"]))


def test_concurrent_requests_each_match_the_request_run_alone(runner: Runner) -> None:
    rng = np.random.RandomState(0)
    prompts = [[256, *rng.randint(0, 256, rng.randint(1, 120))] for _ in range(64)]
    max_tokens = [int(rng.randint(1, 40)) for _ in prompts]
    engine, got = started_engine(runner), Collector()
    for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.submit(Request(str(i), p, SamplingOptions(max_tokens=n, ignore_eos=True)), got.sink)
    got.wait(len(prompts))
    assert engine.shutdown(5)
    for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        assert got.tokens(str(i)) == generate(runner, [p], [GenerationOptions(max_tokens=n)])[0], f"request {i}"
        assert got.final(str(i)).finish_reason == "length"
        assert got.final(str(i)).usage.completion_tokens == n
    assert engine.allocator.num_used == 0


def test_preempted_requests_recompute_to_the_same_output(runner: Runner) -> None:
    prompts = [[256, *range(i, i + 30)] for i in range(8)]
    # 23 pages of 8: not enough for 8 x 70 tokens.
    engine, got = started_engine(runner, "cache.num_pages=24"), Collector()
    for i, p in enumerate(prompts):
        engine.submit(Request(str(i), p, SamplingOptions(max_tokens=40, ignore_eos=True)), got.sink)
    got.wait(len(prompts))
    assert engine.shutdown(5)
    assert engine.metrics.preemptions._value.get() > 0
    for i, p in enumerate(prompts):
        assert got.tokens(str(i)) == generate(runner, [p], [GenerationOptions(max_tokens=40)])[0]
    assert engine.allocator.num_used == 0


def test_cancelling_200_requests_at_random_points_frees_every_page(runner: Runner) -> None:
    rng = np.random.RandomState(1)
    engine, got = started_engine(runner, "engine.max_waiting=1000"), Collector()
    cancel_after = {}
    lock = threading.Lock()

    def sink(out: RequestOutput) -> None:
        got.sink(out)
        with lock:
            seen = len(got.outputs[out.request_id])
        if out.finish_reason is None and seen == cancel_after[out.request_id]:
            engine.cancel(out.request_id)

    for i in range(200):
        rid = f"r{i}"
        cancel_after[rid] = int(rng.randint(1, 20))
        engine.submit(Request(rid, [256, *rng.randint(0, 256, rng.randint(1, 60))],
                              SamplingOptions(max_tokens=30, ignore_eos=True)), sink)
        if i % 3 == 0:
            engine.cancel(rid)  # some are cancelled before they ever run
    got.wait(200)
    assert engine.wait_idle(30)
    # Nothing left the moment the engine is idle: a cancel after the last step has no next plan to clean up after it.
    assert engine.allocator.num_used == 0 and not engine._running and not engine._waiting
    assert engine.shutdown(5)
    reasons = {got.final(f"r{i}").finish_reason for i in range(200)}
    assert reasons <= {"cancelled", "length"} and "cancelled" in reasons
    assert engine.allocator.num_used == 0
    assert not engine._running and not engine._waiting


def test_stop_strings_truncate_text_and_stop_tokens_end_the_stream(runner: Runner) -> None:
    prompt = [256, *b"hello"]
    full = generate(runner, [prompt], [GenerationOptions(max_tokens=30)])[0]
    text = ByteTokenizer().decode(full)
    stop = text[10:12]
    engine, got = started_engine(runner), Collector()
    engine.submit(Request("s", prompt, SamplingOptions(max_tokens=30, stop=(stop,), ignore_eos=True)), got.sink)
    engine.submit(Request("t", prompt, SamplingOptions(max_tokens=30, stop_token_ids=(full[5],), ignore_eos=True)),
                  got.sink)
    got.wait(2)
    engine.shutdown(5)
    assert got.final("s").finish_reason == "stop"
    assert got.text("s") == text[: text.find(stop)]
    assert got.tokens("t") == full[: full.index(full[5]) + 1]
    assert got.final("t").finish_reason == "stop"


def test_logprobs_are_returned_for_each_token(runner: Runner) -> None:
    engine, got = started_engine(runner), Collector()
    engine.submit(Request("l", [256, 1, 2, 3], SamplingOptions(max_tokens=4, logprobs=3, ignore_eos=True)), got.sink)
    got.wait(1)
    engine.shutdown(5)
    lps = [lp for o in got.outputs["l"] for lp in o.logprobs]
    assert len(lps) == 4
    for token, lp in zip(got.tokens("l"), lps, strict=True):
        assert len(lp.top) == 3 and lp.top[0][0] == token and lp.logprob == pytest.approx(lp.top[0][1])


def test_a_full_queue_refuses_more_requests(runner: Runner) -> None:
    config = load_config("configs/tiny.toml", ["runner.warmup=false", "engine.max_waiting=2"])
    engine = Engine(config, runner, ByteTokenizer())  # not started: nothing drains the queue
    engine._thread = threading.current_thread()  # submissions check the loop is alive
    engine.submit(Request("a", [1], SamplingOptions()), lambda _: None)
    engine.submit(Request("b", [1], SamplingOptions()), lambda _: None)
    with pytest.raises(QueueFullError, match="2 requests waiting"):
        engine.submit(Request("c", [1], SamplingOptions()), lambda _: None)


@pytest.mark.parametrize("steps", [0, 3])
def test_a_cancel_leaves_nothing_queued_or_running_before_any_next_step(runner: Runner, steps: int) -> None:
    """Driven on this thread: a cancel handled after the last step (waiting, or running) must not wait for a next
    plan to drop the sequence, since an idle engine makes none."""
    engine = Engine(load_config("configs/tiny.toml", ["runner.warmup=false"]), runner, ByteTokenizer())
    got = Collector()
    engine._thread = threading.current_thread()  # submissions check the loop is alive
    engine.submit(Request("c", [256, 5, 6], SamplingOptions(max_tokens=50, ignore_eos=True)), got.sink)
    engine._drain_inbox(block=False)
    for _ in range(steps):
        engine.step()
    assert (engine._running if steps else engine._waiting)
    engine.cancel("c")
    engine._drain_inbox(block=False)
    assert got.final("c").finish_reason == "cancelled" and engine.num_unfinished == 0
    assert not engine._running and not engine._waiting and engine.allocator.num_used == 0


def test_shutdown_past_the_grace_period_cancels_what_is_left(runner: Runner) -> None:
    engine, got = started_engine(runner), Collector()
    for i in range(4):
        engine.submit(Request(str(i), [256, 5, 6], SamplingOptions(max_tokens=200, ignore_eos=True)), got.sink)
    assert not engine.shutdown(timeout=0)
    got.wait(4)
    assert {got.final(str(i)).finish_reason for i in range(4)} == {"cancelled"}
    assert engine.allocator.num_used == 0
