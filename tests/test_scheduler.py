"""Tests for jaxserve/scheduler.py (and the Sequence state it drives): admission, chunked prefill, decode rows,
preemption by recompute and swap, priorities, rejection, abort, prefix hits, and a randomized run checking pages
are conserved."""

import dataclasses
import random

import numpy as np
import pytest

from jaxserve.kv.cache import KVCache
from jaxserve.kv.pages import PageAllocator, slots_for
from jaxserve.kv.tiers import HostTier
from jaxserve.scheduler import Scheduler, SchedulerConfig, StepPlan
from jaxserve.sequence import SamplingOptions, Sequence, SequenceStatus


def make_seq(rid: str, prompt_len: int, max_tokens: int = 4, arrival: float = 0.0, priority: int = 0) -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), SamplingOptions(max_tokens=max_tokens),
                    arrival_time=arrival, priority=priority)


@dataclasses.dataclass(frozen=True)
class SlotsPayload:
    """A copied page of the Loop's pool."""

    slots: tuple

    def numpy(self) -> tuple:
        return self.slots


class Loop:
    """A stand-in engine: plans, "runs" the plan against a model KV pool that checks every page read, appends a
    token per sampling chunk and finishes sequences at max_tokens. Checks the page invariants after every step.

    Without prefix caching a slot records the (request, position) that wrote it; with it, pages are shared and
    copied through a host tier, so a slot records (token, position)."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = False, host_pages: int = 0,
                 **knobs: int) -> None:
        self.prefix_caching = prefix_caching
        host = HostTier(host_pages * page_size, page_size) if host_pages else None
        self.cache = KVCache(PageAllocator(num_pages, page_size), prefix_caching=prefix_caching, host=host,
                             mover=self if host is not None else None, page_bytes=page_size)
        self.alloc = self.cache.allocator
        self.sched = Scheduler(SchedulerConfig(**knobs))
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.kv: list[tuple[object, int] | None] = [None] * (num_pages * page_size)
        self.completed: list[Sequence] = []
        # Every planned chunk: (request_id, start, length, preemptions so far).
        self.history: list[tuple[str, int, int, int]] = []

    def read_pages(self, pages: list[int]) -> list[SlotsPayload]:
        ps = self.alloc.page_size
        return [SlotsPayload(tuple(self.kv[p * ps: (p + 1) * ps])) for p in pages]

    def write_pages(self, pages: list[int], payloads: list[SlotsPayload]) -> None:
        ps = self.alloc.page_size
        for p, payload in zip(pages, payloads, strict=True):
            self.kv[p * ps: (p + 1) * ps] = list(payload.numpy())

    def slot_owner(self, seq: Sequence, position: int) -> tuple[object, int]:
        return (seq.token_ids[position] if self.prefix_caching else seq.request_id), position

    def submit(self, *seqs: Sequence) -> None:
        self.waiting.extend(seqs)

    def step(self) -> StepPlan:
        plan = self.sched.plan(self.waiting, self.running, self.cache)
        self.waiting, self.running = plan.waiting, plan.running
        ps = self.alloc.page_size
        for chunk in plan.decode + plan.prefill:
            seq = chunk.seq
            self.history.append((seq.request_id, chunk.start, chunk.length, seq.num_preemptions))
            assert seq.status is SequenceStatus.RUNNING
            context = slots_for(seq.block_table, 0, chunk.start, ps)
            assert [self.kv[s] for s in context] == [self.slot_owner(seq, p) for p in range(chunk.start)], \
                f"{seq.request_id}: KV of earlier tokens was lost or overwritten"
            for p, s in zip(range(chunk.start, chunk.start + chunk.length),
                            slots_for(seq.block_table, chunk.start, chunk.length, ps), strict=True):
                assert s // ps != 0, "wrote into the trash page"
                assert self.alloc.refcount(s // ps) == 1, "wrote into a shared page"
                self.kv[s] = self.slot_owner(seq, p)
        self.cache.publish()
        for chunk in plan.decode + plan.prefill:
            if chunk.samples:
                seq = chunk.seq
                seq.append_token(1000 + seq.num_output_tokens)
                if seq.num_output_tokens >= seq.options.max_tokens:
                    self.sched.finish(seq, self.cache, SequenceStatus.FINISHED_LENGTH)
        self.completed += [s for s in self.running + plan.finished if s.is_finished]
        self.check_invariants()
        return plan

    def check_invariants(self) -> None:
        live = [s for s in self.running if not s.is_finished]
        pages = [p for s in live for p in s.block_table]
        if not self.prefix_caching:
            assert len(pages) == len(set(pages)), "two running sequences share a page"
        assert 0 not in pages
        assert all(self.alloc.refcount(p) == pages.count(p) for p in set(pages)), "refcounts disagree with tables"
        assert self.alloc.num_used == len(set(pages))
        self.cache.check_invariants()
        queued = [s for s in self.waiting if not s.is_finished]  # an abort between steps leaves a finished one
        assert all(not s.block_table and s.num_computed_tokens == 0 for s in queued)
        assert all(s.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED) for s in queued)

    def run_until_done(self, max_steps: int = 1000) -> int:
        for steps in range(1, max_steps + 1):
            plan = self.step()
            live = [s for s in self.waiting + self.running if not s.is_finished]
            if not live:
                return steps
            assert not plan.is_empty or plan.finished, "no progress while sequences are live"
        raise AssertionError("did not finish")


def test_admits_waiting_sequences_only_while_their_pages_fit():
    loop = Loop(num_pages=5, page_size=4, max_batch=4, max_step_tokens=64, max_chunk=64)
    a, b, c = make_seq("a", 8), make_seq("b", 8, arrival=1), make_seq("c", 4, arrival=2)
    loop.submit(a, b, c)
    plan = loop.step()
    assert [ch.seq for ch in plan.prefill] == [a, b]
    assert len(a.block_table) == len(b.block_table) == 2
    assert loop.waiting == [c] and c.status is SequenceStatus.WAITING  # c would fit a later page, but b used them
    assert loop.alloc.num_free == 0


def test_admission_stops_at_max_batch():
    loop = Loop(num_pages=64, page_size=4, max_batch=2, max_step_tokens=64, max_chunk=64)
    loop.submit(*(make_seq(f"s{i}", 3, arrival=i) for i in range(4)))
    plan = loop.step()
    assert [ch.seq.request_id for ch in plan.prefill] == ["s0", "s1"]
    assert [s.request_id for s in loop.waiting] == ["s2", "s3"]


def test_long_prompt_is_prefilled_in_chunks_over_several_steps():
    loop = Loop(num_pages=32, page_size=4, max_batch=2, max_step_tokens=12, max_chunk=8)
    seq = make_seq("long", 30)
    loop.submit(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        plan = loop.step()
        assert plan.num_tokens <= 12
        chunks += [(c.start, c.length, c.samples) for c in plan.prefill]
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True)]
    assert len(seq.block_table) == 8  # all prompt pages were reserved at admission


def test_token_budget_is_shared_between_prompts():
    loop = Loop(num_pages=32, page_size=4, max_batch=4, max_step_tokens=16, max_chunk=16)
    a, b = make_seq("a", 10), make_seq("b", 10, arrival=1)
    loop.submit(a, b)
    plan = loop.step()
    assert [(c.seq, c.start, c.length) for c in plan.prefill] == [(a, 0, 10), (b, 0, 6)]
    plan = loop.step()
    assert [(c.seq, c.start, c.length) for c in plan.decode] == [(a, 10, 1)]
    assert [(c.seq, c.start, c.length, c.samples) for c in plan.prefill] == [(b, 6, 4, True)]


def test_decode_rows_join_the_next_step_and_leave_when_finished():
    loop = Loop(num_pages=32, page_size=4, max_batch=4, max_step_tokens=64, max_chunk=64)
    a, b = make_seq("a", 5, max_tokens=3), make_seq("b", 6, max_tokens=5, arrival=1)
    loop.submit(a)
    loop.step()  # a prefills and samples its first token
    loop.submit(b)
    plan = loop.step()
    assert [c.seq for c in plan.decode] == [a] and [c.seq for c in plan.prefill] == [b]
    assert plan.decode[0].start == 5 and plan.decode[0].samples
    plan = loop.step()
    assert [c.seq for c in plan.decode] == [a, b]
    assert a.status is SequenceStatus.FINISHED_LENGTH and a.output_token_ids == [1000, 1001, 1002]
    assert a.block_table == []
    plan = loop.step()
    assert [c.seq for c in plan.decode] == [b] and loop.running == [b]


def test_decode_takes_a_new_page_only_when_crossing_a_page_boundary():
    loop = Loop(num_pages=32, page_size=4, max_batch=1, max_step_tokens=8, max_chunk=8)
    seq = make_seq("s", 3, max_tokens=8)
    loop.submit(seq)
    sizes = []
    for _ in range(7):
        loop.step()
        sizes.append(len(seq.block_table))
    # Tokens 0-2 prefill into page 1; decode writes position 3 (same page), then 4 (new page), ... 8 (new page).
    assert sizes == [1, 1, 2, 2, 2, 2, 3]


def test_preemption_under_page_pressure_frees_pages_and_the_sequence_resumes():
    loop = Loop(num_pages=5, page_size=4, max_batch=2, max_step_tokens=32, max_chunk=32)
    early, late = make_seq("early", 8, max_tokens=6), make_seq("late", 8, max_tokens=3, arrival=1)
    loop.submit(early, late)
    loop.step()  # both prefill 2 pages each: the pool (4 pages) is full
    assert loop.alloc.num_free == 0
    plan = loop.step()  # both decode position 8 and need a third page: the later arrival yields
    assert plan.preempted == [late] and [c.seq for c in plan.decode] == [early]
    assert late.status is SequenceStatus.PREEMPTED and late.block_table == [] and late.num_computed_tokens == 0
    assert late.output_token_ids == [1000] and late.num_preemptions == 1
    assert loop.waiting == [late] and loop.alloc.num_used == 3
    loop.run_until_done()
    assert early.status is late.status is SequenceStatus.FINISHED_LENGTH
    assert late.output_token_ids == [1000, 1001, 1002]
    assert loop.alloc.num_free == loop.alloc.num_usable


def test_recompute_prefill_covers_prompt_and_output():
    loop = Loop(num_pages=5, page_size=4, max_batch=2, max_step_tokens=32, max_chunk=32)
    early, late = make_seq("early", 8, max_tokens=2), make_seq("late", 8, max_tokens=3, arrival=1)
    loop.submit(early, late)
    loop.step()
    loop.step()  # late preempted with one output token; early finishes
    plan = loop.step()
    assert [(c.seq, c.start, c.length, c.samples) for c in plan.prefill] == [(late, 0, 9, True)]
    assert late.status is SequenceStatus.RUNNING


def test_lowest_priority_running_sequence_is_preempted_first():
    loop = Loop(num_pages=7, page_size=4, max_batch=3, max_step_tokens=32, max_chunk=32)
    important = make_seq("important", 8, max_tokens=4, arrival=2, priority=0)
    background = make_seq("background", 8, max_tokens=4, arrival=0, priority=5)
    normal = make_seq("normal", 8, max_tokens=4, arrival=1, priority=1)
    loop.submit(background, normal, important)
    loop.step()
    assert loop.running == [important, normal, background]
    plan = loop.step()
    assert plan.preempted == [background]


def test_admission_follows_priority_then_arrival():
    loop = Loop(num_pages=64, page_size=4, max_batch=1, max_step_tokens=8, max_chunk=8)
    order = [make_seq("late-urgent", 2, max_tokens=1, arrival=5, priority=-1),
             make_seq("first", 2, max_tokens=1, arrival=1),
             make_seq("second", 2, max_tokens=1, arrival=2)]
    loop.submit(order[2], order[1], order[0])
    admitted = [loop.step().prefill[0].seq.request_id for _ in range(3)]
    assert admitted == ["late-urgent", "first", "second"]


def test_head_of_line_request_is_not_bypassed_by_smaller_ones():
    loop = Loop(num_pages=5, page_size=4, max_batch=4, max_step_tokens=64, max_chunk=64)
    small = make_seq("small", 4, max_tokens=3)
    big = make_seq("big", 13, max_tokens=1, arrival=1)
    tiny = make_seq("tiny", 1, max_tokens=1, arrival=2)
    loop.submit(small, big, tiny)
    plan = loop.step()
    assert [c.seq for c in plan.prefill] == [small]  # big needs 4 pages, 3 are left: tiny waits behind it
    assert loop.waiting == [big, tiny]
    loop.run_until_done()
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in (small, big, tiny))


def test_prompt_that_can_never_fit_is_rejected_with_an_error():
    loop = Loop(num_pages=4, page_size=4, max_batch=2, max_step_tokens=64, max_chunk=64, max_seq_len=64)
    too_big, ok = make_seq("too-big", 13), make_seq("ok", 4, max_tokens=1, arrival=1)
    loop.submit(too_big, ok)
    plan = loop.step()
    assert plan.finished == [too_big] and too_big.status is SequenceStatus.FINISHED_ERROR
    assert "prompt of 13 tokens exceeds the 12-token limit" in too_big.error
    assert too_big.finish_reason == "error"
    assert [c.seq for c in plan.prefill] == [ok] and too_big not in loop.waiting


def test_prompt_longer_than_max_seq_len_is_rejected():
    loop = Loop(num_pages=64, page_size=4, max_batch=2, max_step_tokens=64, max_chunk=64, max_seq_len=16)
    seq = make_seq("s", 17)
    loop.submit(seq)
    assert loop.step().finished == [seq] and "max_seq_len=16" in seq.error


def test_sequence_that_outgrows_the_pool_finishes_with_length():
    loop = Loop(num_pages=3, page_size=4, max_batch=1, max_step_tokens=8, max_chunk=8, max_seq_len=64)
    seq = make_seq("s", 6, max_tokens=100)
    loop.submit(seq)
    loop.run_until_done()
    assert seq.status is SequenceStatus.FINISHED_LENGTH
    assert seq.num_tokens == 9 and seq.num_computed_tokens == 8  # the 9th token is returned but never stored


def test_abort_frees_pages_at_once_and_the_next_plan_drops_the_sequence():
    loop = Loop(num_pages=8, page_size=4, max_batch=2, max_step_tokens=64, max_chunk=64)
    a, b = make_seq("a", 10, max_tokens=50), make_seq("b", 3, max_tokens=50, arrival=1)
    loop.submit(a, b)
    loop.step()
    used = loop.alloc.num_used
    loop.sched.abort(a, loop.cache)
    assert a.status is SequenceStatus.FINISHED_CANCELLED and a.block_table == []
    assert loop.alloc.num_used == used - 3
    plan = loop.step()
    assert [c.seq for c in plan.decode] == [b] and loop.running == [b]
    loop.sched.abort(a, loop.cache)  # cancelling a finished sequence is a no-op
    assert a.status is SequenceStatus.FINISHED_CANCELLED


def test_abort_of_a_waiting_sequence_removes_it_from_the_queue():
    loop = Loop(num_pages=8, page_size=4, max_batch=1, max_step_tokens=64, max_chunk=64)
    a, b = make_seq("a", 3), make_seq("b", 3, arrival=1)
    loop.submit(a, b)
    loop.step()
    loop.sched.abort(b, loop.cache)
    loop.step()
    assert loop.waiting == []


def test_finish_refuses_a_live_status_and_a_second_finish():
    sched, cache = Scheduler(SchedulerConfig()), KVCache(PageAllocator(4, 4))
    seq = make_seq("s", 2)
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish(seq, cache, SequenceStatus.RUNNING)
    sched.finish(seq, cache, SequenceStatus.FINISHED_STOPPED)
    with pytest.raises(ValueError, match="already finished"):
        sched.finish(seq, cache, SequenceStatus.FINISHED_ERROR)


def test_config_and_options_validate_their_fields():
    with pytest.raises(ValueError, match="scheduler.max_step_tokens: must be >= max_batch"):
        SchedulerConfig(max_batch=8, max_step_tokens=4)
    with pytest.raises(ValueError, match="scheduler.preemption"):
        SchedulerConfig(preemption="evict")
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingOptions(max_tokens=0)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Sequence("empty", [])


def test_sequence_token_helpers():
    seq = make_seq("s", 3)
    assert (seq.num_tokens, seq.num_uncomputed, seq.last_token, seq.finish_reason) == (3, 3, 3, None)
    seq.num_computed_tokens = 3
    seq.append_token(42)
    assert seq.token_ids == [1, 2, 3, 42] and seq.last_token == 42 and seq.num_uncomputed == 1


@pytest.mark.parametrize("seed", range(25))
def test_random_workload_conserves_pages_and_finishes_everything(seed):
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 8])
    num_pages = rng.randint(4, 40)
    max_batch = rng.randint(1, 6)
    caching = seed % 2 == 1  # odd seeds share prefixes through the cache, with a host tier and swap preemption
    loop = Loop(num_pages, page_size, prefix_caching=caching, host_pages=rng.randint(0, 30) if caching else 0,
                max_batch=max_batch, max_step_tokens=rng.randint(max_batch, 48), max_chunk=rng.randint(1, 32),
                max_seq_len=rng.randint(8, 200), preemption=rng.choice(["auto", "swap", "recompute"]),
                swap_min_tokens=rng.randint(0, 20))
    seqs = [make_seq(f"r{i}", rng.randint(1, 60), max_tokens=rng.randint(1, 30), arrival=float(i),
                     priority=rng.choice([0, 0, 0, 1, 2])) for i in range(rng.randint(5, 40))]
    arrivals = sorted(rng.randint(0, 60) for _ in seqs)
    cancelled = set()
    for step in range(5000):
        loop.submit(*(s for s, t in zip(seqs, arrivals, strict=True) if t == step))
        if rng.random() < 0.05:
            live = [s for s in loop.waiting + loop.running if not s.is_finished]
            if live:
                victim = rng.choice(live)
                loop.sched.abort(victim, loop.cache)
                cancelled.add(victim.request_id)
                loop.check_invariants()
        loop.step()
        if step > max(arrivals) and all(s.is_finished for s in seqs):
            break
    else:
        raise AssertionError("workload did not finish")
    assert loop.alloc.num_free == loop.alloc.num_usable
    capacity = loop.sched.capacity(loop.cache)
    for s in seqs:
        if s.request_id in cancelled:
            assert s.status is SequenceStatus.FINISHED_CANCELLED
        elif s.num_prompt_tokens > capacity:
            assert s.status is SequenceStatus.FINISHED_ERROR and s.num_output_tokens == 0
        else:
            assert s.status is SequenceStatus.FINISHED_LENGTH
            assert s.num_output_tokens == s.options.max_tokens or s.num_tokens == capacity + 1
            assert s.output_token_ids == [1000 + i for i in range(s.num_output_tokens)]
    assert np.all([s.block_table == [] for s in seqs])


def test_static_batching_admits_nobody_until_the_batch_drains() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=4, max_step_tokens=64, max_chunk=16, max_seq_len=64,
                                      static_batching=True))
    cache = KVCache(PageAllocator(64, 4))
    first, second = Sequence("a", [1, 2, 3]), Sequence("b", [4, 5])
    plan = sched.plan([first], [], cache)
    assert plan.running == [first]
    plan = sched.plan([second], plan.running, cache)
    assert plan.running == [first] and plan.waiting == [second]
    sched.finish(first, cache, SequenceStatus.FINISHED_LENGTH)
    plan = sched.plan(plan.waiting, plan.running, cache)
    assert plan.running == [second]


def test_a_cached_prefix_is_not_prefilled_again():
    loop = Loop(num_pages=32, page_size=4, prefix_caching=True, max_batch=4, max_step_tokens=64, max_chunk=64)
    a = make_seq("a", 10, max_tokens=1)
    loop.submit(a)
    loop.run_until_done()
    b = make_seq("b", 12, max_tokens=1)  # shares a's first two full pages
    loop.submit(b)
    plan = loop.step()
    assert [(c.seq, c.start, c.length) for c in plan.prefill] == [(b, 8, 4)]
    assert b.cached_tokens["device"] == 8


def test_swap_preemption_resumes_without_recomputing_any_token():
    loop = Loop(num_pages=7, page_size=4, prefix_caching=True, host_pages=16, max_batch=2, max_step_tokens=32,
                max_chunk=32, preemption="swap")
    early, late = make_seq("early", 10, max_tokens=8), make_seq("late", 10, max_tokens=4, arrival=1)
    late.prompt_token_ids = [t + 100 for t in late.prompt_token_ids]  # nothing shared with early
    loop.submit(early, late)
    for _ in range(4):
        plan = loop.step()
    assert plan.preempted == [late]  # both needed a 4th page for position 12: late yields, 12 tokens computed
    loop.run_until_done()
    resumed = [c for c in loop.history if c[0] == "late" and c[3] == 1]
    assert resumed[0][1] == 12  # its first chunk after resuming starts where it stopped
    assert late.output_token_ids == [1000, 1001, 1002, 1003]
