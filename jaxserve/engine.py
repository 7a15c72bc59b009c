"""The engine loop: one thread that owns every piece of mutable serving state and wires scheduler, runner and KV.

Other threads only `submit` and `cancel` through a thread-safe inbox and receive `RequestOutput`s through the sink
callback they registered. Each step: drain the inbox, ask the scheduler for a plan, dispatch the runner calls, read
all sampled ids back in one device-to-host transfer, append tokens, check stops, free pages, push outputs.

Asynchronous scheduling (`engine.async_scheduling`, on by default) overlaps the host with the device: a step is
planned and dispatched while the previous one still runs, and the previous step's ids are read only afterwards.
Decode rows whose input token is still being sampled take it on the device from the previous step's decode or
prefill outputs (`runner.Feed`); the sequence holds a `PENDING` placeholder meanwhile, so plans see its true
length. What it costs: a sequence that stops is found one step late, so its row in the following step is computed
and discarded (its pages are freed then).
Why: on a 2-core host the dispatch of a 110M-model step (~1.3 ms) and the bookkeeping around it are otherwise
serial with the device; on an accelerator the device waits on the host every step.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import random
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from jaxserve.config import Config
from jaxserve.kv.cache import KVCache
from jaxserve.kv.pages import PageAllocator, block_table_array, pages_for, slots_for
from jaxserve.kv.tiers import DiskTier, HostTier
from jaxserve.metrics import Metrics
from jaxserve.outputs import TokenLogprob, Usage
from jaxserve.runner import Feed, Runner, StepBatch
from jaxserve.sampling import Sampled
from jaxserve.scheduler import Chunk, Scheduler, SchedulerConfig, StepPlan
from jaxserve.sequence import SamplingOptions, Sequence, SequenceStatus
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer


class QueueFullError(RuntimeError):
    """The waiting queue is at `engine.max_waiting`."""


class EngineStoppedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated generation request (the server has checked ids, lengths and options)."""

    request_id: str
    prompt_token_ids: list[int]
    options: SamplingOptions
    priority: int = 0


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One delta of a request's stream; the last one has `finish_reason` (and `error` when it failed)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None


Sink = Callable[[RequestOutput], None]


@dataclasses.dataclass
class _Dispatched:
    """A step whose runner calls are dispatched and whose sampled ids have not been read yet."""

    plan: StepPlan
    calls: list[tuple[list[Chunk], Sampled]]
    # Each chunk that samples: (chunk, index of its call, row in that call, output index of its placeholder).
    samples: list[tuple[Chunk, int, int, int]]
    # Where each sampling sequence's id is in the step's outputs, as `runner.Feed` indexes them: its row in the
    # decode call (calls[0]), or the decode bucket plus its place among the prefill calls.
    sources: dict[Sequence, int]
    completed: bool = False


@dataclasses.dataclass
class _Tracked:
    """Engine-side bookkeeping of one request beside its Sequence."""

    seq: Sequence
    sink: Sink
    detok: IncrementalDetokenizer | None
    held_text: str = ""
    first_scheduled: float | None = None
    last_token_time: float | None = None


class Engine:
    """Continuous batching over a Runner. Thread-safe: `submit`, `cancel`, `shutdown`; everything else is internal."""

    def __init__(self, config: Config, runner: Runner, tokenizer: Tokenizer | None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.metrics = metrics if metrics is not None else Metrics()
        r = config.runner
        self.scheduler = Scheduler(SchedulerConfig(
            max_batch=r.max_batch, max_step_tokens=config.engine.max_step_tokens, max_chunk=r.max_chunk,
            max_seq_len=r.max_seq_len, preemption=config.engine.preemption,
            swap_min_tokens=config.engine.swap_min_tokens, static_batching=config.engine.batching == "static"))
        self.cache = self._build_cache()
        self.eos_ids = frozenset(config.model.eos_token_ids)
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._tracked: dict[str, _Tracked] = {}
        self._num_queued = 0  # submitted but not yet admitted; written by both sides under _count_lock
        self._count_lock = threading.Lock()
        self._accepting = True
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._loop_done = False
        self._thread: threading.Thread | None = None
        self._inflight: _Dispatched | None = None  # asynchronous scheduling: the step whose ids are still out
        self.fatal_error: BaseException | None = None
        self.metrics.kv_pages_total.set(self.allocator.num_usable)
        for tier, capacity in (("host", self.cache.host), ("disk", self.cache.disk)):
            if capacity is not None:
                self.metrics.kv_tier_capacity_bytes.labels(tier).set(capacity.capacity_pages * capacity.page_bytes)

    def _build_cache(self) -> KVCache:
        c, runner = self.config.cache, self.runner
        salt = runner.cache_salt() if c.prefix_caching else b""
        host = disk = None
        if c.has_host_tier:
            if c.disk_path:
                # One subdirectory per salt: models (or layouts) sharing a disk path never touch each other's pages.
                disk = DiskTier(os.path.join(c.disk_path, salt.hex()), c.disk_bytes, runner.page_shape,
                                runner.page_dtype)
            host = HostTier(c.host_bytes, runner.page_bytes, spill=disk.put if disk is not None else None)
        return KVCache(PageAllocator(c.num_pages, c.page_size), prefix_caching=c.prefix_caching, salt=salt,
                       host=host, disk=disk,
                       mover=runner if host is not None else None, page_bytes=runner.page_bytes, metrics=self.metrics)

    @property
    def allocator(self) -> PageAllocator:
        """The device page allocator (read it only on the loop thread or when the engine is idle)."""
        return self.cache.allocator
    # ----- the thread-safe surface -----

    def start(self) -> None:
        """Starts the loop thread."""
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """Whether the loop thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished (read from any thread; a snapshot)."""
        return len(self._tracked) + self._inbox.qsize()

    def submit(self, request: Request, sink: Sink) -> None:
        """Queues a request; `sink` receives its outputs on the engine thread (it must not block)."""
        if not self._accepting or not self.is_alive:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        with self._count_lock:
            if self._num_queued >= self.config.engine.max_waiting:
                raise QueueFullError(f"the queue is full ({self.config.engine.max_waiting} requests waiting)")
            self._num_queued += 1
        self._inbox.put(("submit", (request, sink)))

    def cancel(self, request_id: str) -> None:
        """Cancels a request; its pages are freed before the next step."""
        self._inbox.put(("cancel", request_id))

    def stop_accepting(self) -> None:
        """Refuses new submissions from now on; in-flight requests continue."""
        self._accepting = False

    def evict_cache(self, tier: str, timeout: float | None = 60.0) -> None:
        """Pushes every cached page not in use below `tier` ("device": to the host tier; "host": down to disk) and
        waits until it is done; benchmarks and tests use it to measure each tier's hits."""
        if tier not in ("device", "host"):
            raise ValueError(f"tier: must be 'device' or 'host', got {tier!r}")
        done = threading.Event()

        def evict() -> None:
            self.cache.evict_device()
            self.cache.finish_copies()
            if tier == "host":
                self.cache.spill_host()
            done.set()

        self._inbox.put(("call", evict))
        if not done.wait(timeout):
            raise TimeoutError(f"evicting the {tier} tier did not finish within {timeout} s")

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Blocks until every submitted request has finished (or the loop died); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._loop_done or not self.num_unfinished, timeout)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stops taking requests, lets in-flight ones finish for up to `timeout` seconds, cancels the rest, stops.

        Returns True when everything finished within the grace period.
        """
        self._accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        drained = self.wait_idle(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not drained:
            for rid in list(self._tracked):
                self.cancel(rid)
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=10)
        return drained

    # ----- the loop -----

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not (self._waiting or self._running or self._inflight))
                if self._stop.is_set():
                    break
                self.step()
            # Cancels queued by a shutdown whose grace period ran out still owe their requests a final output.
            self._drain_inbox(block=False)
            for t in list(self._tracked.values()):
                self.scheduler.abort(t.seq, self.cache)
                self._emit_final(t, "cancelled", "the engine stopped")
            self.cache.close()
        except BaseException as e:  # the loop must never die silently: the server watches fatal_error
            logging.exception("engine loop died")
            self.fatal_error = e
            for t in list(self._tracked.values()):
                t.seq.drop_pending()
                self._emit_final(t, "error", f"engine failure: {e}")
        finally:
            with self._idle:
                self._loop_done = True
                self._idle.notify_all()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        try:
            self._handle_inbox(item)
        finally:
            self._notify_if_idle()

    def _notify_if_idle(self) -> None:
        if not self.num_unfinished:
            with self._idle:
                self._idle.notify_all()

    def _handle_inbox(self, item: tuple[str, object]) -> None:
        while True:
            kind, payload = item
            if kind == "submit":
                self._admit(*payload)  # type: ignore[misc]
            elif kind == "cancel":
                self._cancel(payload)  # type: ignore[arg-type]
            elif kind == "call":
                payload()  # type: ignore[operator]
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, request: Request, sink: Sink) -> None:
        opts = request.options
        if opts.seed is None:
            opts = dataclasses.replace(opts, seed=random.getrandbits(32))
        seq = Sequence(request.request_id, list(request.prompt_token_ids), opts, priority=request.priority)
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids) if self.tokenizer else None
        if seq.request_id in self._tracked:
            self._release_queue_slot()
            sink(RequestOutput(seq.request_id, [], "", [], "error", f"request id {seq.request_id!r} is in use"))
            return
        self._tracked[seq.request_id] = _Tracked(seq, sink, detok)
        self._waiting.append(seq)
        self.cache.prefetch(seq)
        self.metrics.prompt_tokens.inc(len(seq.prompt_token_ids))

    def _cancel(self, request_id: str) -> None:
        t = self._tracked.get(request_id)
        if t is None:
            return
        self.scheduler.abort(t.seq, self.cache)
        # Out of the queues at once, so an engine that is idle holds nothing (the next plan would drop it as well,
        # but a cancel that arrives after the last step has no next plan until another request comes).
        self._waiting = [s for s in self._waiting if s is not t.seq]
        self._running = [s for s in self._running if s is not t.seq]
        self._emit_final(t, "cancelled")

    def _release_queue_slot(self) -> None:
        with self._count_lock:
            self._num_queued -= 1

    def step(self) -> None:
        """Plans and runs one step (called on the loop thread; tests may call it directly when not started).

        With asynchronous scheduling the step is left running and the previous step's results are processed once
        it is dispatched; otherwise it is completed here.
        """
        plan = self.scheduler.plan(self._waiting, self._running, self.cache)
        self._waiting, self._running = plan.waiting, plan.running
        now = time.monotonic()
        for seq in plan.finished:
            self._emit_final(self._tracked[seq.request_id], seq.finish_reason or "error", seq.error)
        self.metrics.preemptions.inc(len(plan.preempted))
        for chunk in plan.decode + plan.prefill:
            t = self._tracked[chunk.seq.request_id]
            if t.first_scheduled is None:
                t.first_scheduled = now
                self._release_queue_slot()
                self.metrics.queue_time.observe(now - t.seq.arrival_time)
        previous, self._inflight = self._inflight, None
        current = None
        if not plan.is_empty:
            try:
                current = self._dispatch(plan, previous)
            except Exception as e:
                if previous is not None and not previous.completed:
                    self._complete(previous)
                self._fail_step([plan], e)
            else:
                self.cache.publish()
        if previous is not None and not previous.completed:
            if not self._complete(previous, current.plan if current is not None else None):
                current = None  # it was fed by the failed step and failed with it
        if current is not None:
            if self.config.engine.async_scheduling:
                self._inflight = current
            else:
                self._complete(current)
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.kv_pages_used.set(self.allocator.num_used)
        self.metrics.compilations.set(self.runner.compile_count)
        self.cache.report()
        self.cache.settle()

    def _batch(self, chunks: list[Chunk]) -> StepBatch:
        ps = self.config.cache.page_size
        length = max(c.length for c in chunks)
        width = max(pages_for(c.start + c.length, ps) for c in chunks)
        tokens = np.zeros((len(chunks), length), np.int32)
        positions = np.full((len(chunks), length), -1, np.int32)
        slots = np.zeros((len(chunks), length), np.int32)
        for r, c in enumerate(chunks):
            known = max(0, min(c.length, c.seq.num_known_tokens - c.start))  # a pending token is fed or patched
            tokens[r, :known] = c.seq.token_ids[c.start: c.start + known]
            positions[r, : c.length] = np.arange(c.start, c.start + c.length)
            slots[r, : c.length] = slots_for(c.seq.block_table, c.start, c.length, ps)
        opts = [c.seq.options for c in chunks]
        return StepBatch(
            tokens, positions, slots, block_table_array([c.seq.block_table[:width] for c in chunks], width),
            np.array([c.length - 1 for c in chunks], np.int32),
            np.array([o.temperature for o in opts], np.float32), np.array([o.top_k for o in opts], np.int32),
            np.array([o.top_p for o in opts], np.float32), np.array([o.seed for o in opts], np.uint32),
            np.array([o.logprobs for o in opts], np.int32))

    def _dispatch(self, plan: StepPlan, previous: _Dispatched | None) -> _Dispatched | None:
        """Dispatches every runner call of the step without waiting for any result (None: not dispatched, because
        the previous step failed and took this one's requests with it).

        Decode rows whose input token `previous` is still sampling take it from previous's outputs on the device.
        Where that cannot be done, `previous` is completed first (after every batch is built: completing can finish
        sequences and free their pages).
        """
        batches = [(plan.decode, self._batch(plan.decode))] if plan.decode else []
        batches += [([chunk], self._batch([chunk])) for chunk in plan.prefill]
        feed = None
        if plan.decode and previous is not None:
            pending = [c.start >= c.seq.num_known_tokens for c in plan.decode]
            rows = np.array([previous.sources.get(c.seq, -1) if p else -1
                             for c, p in zip(plan.decode, pending, strict=True)], np.int32)
            prefill = tuple(out.token for _, out in previous.calls[1 if previous.plan.decode else 0:])
            if (any(p and r < 0 for p, r in zip(pending, rows, strict=True))
                    or len(prefill) > self.config.runner.max_batch):
                if not self._complete(previous, plan):
                    return None
                tokens = batches[0][1].tokens
                for r, c in enumerate(plan.decode):
                    if pending[r] and c.start < c.seq.num_known_tokens:
                        tokens[r, 0] = c.seq.token_ids[c.start]
            elif (rows >= 0).any():
                decode = previous.calls[0][1].token if previous.plan.decode else None
                feed = Feed(decode, rows, prefill)
        calls: list[tuple[list[Chunk], Sampled]] = []
        for i, (chunks, batch) in enumerate(batches):
            if i == 0 and plan.decode:
                calls.append((chunks, self.runner.decode(batch, feed)))
            else:
                calls.append((chunks, self.runner.prefill(batch)))
        for _, out in calls:  # the ids travel to the host while the next step is planned
            for array in jax.tree.leaves(out):
                array.copy_to_host_async()
        samples = [(c, i, row, c.seq.append_pending()) for i, (chunks, _) in enumerate(calls)
                   for row, c in enumerate(chunks) if c.samples and not c.seq.is_finished]
        sources = {c.seq: row for row, c in enumerate(plan.decode)}
        base = calls[0][1].token.shape[0] if plan.decode else self.runner.decode_buckets[0]
        for j, chunk in enumerate(plan.prefill):
            sources[chunk.seq] = base + j
        return _Dispatched(plan, calls, samples, sources)

    def _complete(self, step: _Dispatched, dependent: StepPlan | None = None) -> bool:
        """Reads a dispatched step's sampled ids and processes them; False if the step failed, in which case the
        requests of `dependent` (a step planned or dispatched after it, on its outputs) fail with it."""
        step.completed = True
        try:
            host = jax.device_get([out for _, out in step.calls])
        except Exception as e:
            self._fail_step([step.plan] + ([dependent] if dependent is not None else []), e)
            return False
        self._postprocess(step, host)
        return True

    def _fail_step(self, plans: list[StepPlan], error: Exception) -> None:
        """Fails the steps' requests with a clear error; if the KV pool was lost, the others recompute."""
        logging.exception("engine step failed")
        self.metrics.step_failures.inc()
        message = f"step failed: {type(error).__name__}: {error}"
        for plan in plans:
            for chunk in plan.decode + plan.prefill:
                t = self._tracked.get(chunk.seq.request_id)
                if t is not None and not chunk.seq.is_finished:
                    self.scheduler.finish(chunk.seq, self.cache, SequenceStatus.FINISHED_ERROR, message)
                    self._emit_final(t, "error", message)
        # Pages the failed step should have filled may be indexed already: the device cache cannot be trusted.
        self.cache.reset_device()
        if self.runner.recover():
            for seq in self._running:
                if not seq.is_finished:
                    self.scheduler.preempt(seq, self.cache, allow_swap=False)
            self._waiting = self._waiting + [s for s in self._running if not s.is_finished]
            self._running = []

    def _postprocess(self, step: _Dispatched, host: list[Sampled]) -> None:
        now = time.monotonic()
        ps = self.config.cache.page_size
        for chunk, call, row, index in step.samples:
            seq = chunk.seq
            if seq.is_finished:
                continue  # cancelled, or stopped by an earlier token, while the step ran
            t = self._tracked[seq.request_id]
            try:
                self._append(t, row, host[call], index, now)
            except Exception as e:  # one request's bad output (e.g. a detokenizer error) must not stop the rest
                logging.exception("postprocessing request %s failed", seq.request_id)
                if not seq.is_finished:
                    self.scheduler.finish(seq, self.cache, SequenceStatus.FINISHED_ERROR, str(e))
                self._emit_final(t, "error", f"output processing failed: {type(e).__name__}: {e}")
            position = seq.num_prompt_tokens + index
            if not seq.is_finished and seq.num_computed_tokens > position:
                # Its KV is already planned (the step after is running): the page it completes could not be keyed
                # while it was pending.
                self.cache.commit(seq, position - position % ps)
        self.cache.publish()

    def _append(self, t: _Tracked, row: int, out: Sampled, index: int, now: float) -> None:
        """Resolves a sequence's output token `index` from row `row` of a step's results, checks its stops and
        streams the delta."""
        seq = t.seq
        token = int(out.token[row])
        seq.resolve(index, token)
        self.metrics.generation_tokens.inc()
        if t.last_token_time is None:
            self.metrics.ttft.observe(now - seq.arrival_time)
        else:
            self.metrics.inter_token.observe(now - t.last_token_time)
        t.last_token_time = now
        n = seq.options.logprobs
        logprobs = [TokenLogprob(float(out.logprob[row]),
                                 [(int(i), float(v)) for i, v in zip(out.top_tokens[row][:n],
                                                                     out.top_logprobs[row][:n], strict=True)])
                    ] if n else []
        reason = self._stop_reason(seq, token, index + 1)
        text, hit_stop_string = self._text_delta(t, token, final=reason is not None)
        if hit_stop_string:
            reason = "stop"
        if reason is None:
            t.sink(RequestOutput(seq.request_id, [token], text, logprobs))
            return
        status = SequenceStatus.FINISHED_STOPPED if reason == "stop" else SequenceStatus.FINISHED_LENGTH
        self.scheduler.finish(seq, self.cache, status)
        self._emit_final(t, reason, None, [token], text, logprobs)

    def _stop_reason(self, seq: Sequence, token: int, produced: int) -> str | None:
        """Why the sequence ends at `token`, its `produced`-th output token (None: it goes on)."""
        opts = seq.options
        if token in opts.stop_token_ids or (not opts.ignore_eos and token in self.eos_ids):
            return "stop"
        if produced >= opts.max_tokens:
            return "length"
        return None

    def _text_delta(self, t: _Tracked, token: int, final: bool) -> tuple[str, bool]:
        """New text to stream, holding back a tail that could begin a stop string; truncates at a stop string."""
        if t.detok is None:
            return "", False
        t.held_text += t.detok.add([token])
        stops = t.seq.options.stop
        if final:
            t.held_text += t.detok.flush()
        hits = [i for i in (t.held_text.find(s) for s in stops) if i >= 0]
        if hits:
            text, t.held_text = t.held_text[: min(hits)], ""
            return text, True
        keep = 0 if final or not stops else max(len(s) for s in stops) - 1
        cut = len(t.held_text) - keep
        text, t.held_text = t.held_text[:cut], t.held_text[cut:]
        return text, False

    def _emit_final(self, t: _Tracked, reason: str, error: str | None = None, token_ids: list[int] | None = None,
                    text: str = "", logprobs: list[TokenLogprob] | None = None) -> None:
        """Sends the last output of a request and forgets it."""
        seq = t.seq
        if self._tracked.pop(seq.request_id, None) is None:
            return
        if t.first_scheduled is None:
            self._release_queue_slot()
        self.metrics.requests_finished.labels(reason).inc()
        self.metrics.e2e.observe(time.monotonic() - seq.arrival_time)
        cached = seq.cached_tokens
        usage = Usage(len(seq.prompt_token_ids), seq.num_output_tokens, sum(cached.values()),
                      cached.get("device", 0), cached.get("host", 0), cached.get("disk", 0))
        t.sink(RequestOutput(seq.request_id, token_ids or [], text, logprobs or [], reason, error, usage))
        self._notify_if_idle()
