"""Pure scheduling policy, no JAX: given the waiting and running sequences and the KV cache, plan one step.

Iteration-level continuous batching in the style of vLLM v1 / nano-vllm. Each step:

1. Running sequences ready to decode get one token each, most important first (lower `priority`, then earlier
   arrival). A row that needs a new page and finds none preempts the least important running sequence (possibly
   itself): its pages are released, `num_computed_tokens` drops to 0 and its output tokens are kept. When it is
   admitted again, the prefix cache gives back what survived of its KV and the rest (at worst prompt + output) is
   prefilled. Swap preemption also saves its partial last page to the host, so nothing is recomputed; it is chosen
   when the sequence has computed at least `swap_min_tokens` (below that, one short prefill chunk costs less than
   copying its page down and back) and a host tier exists.
2. Running sequences still prefilling get their next chunk under the step's token budget.
3. Waiting sequences are admitted in the same order while a batch row, budget and pages for all their tokens are
   free (none are admitted in a step that preempted); a cached prefix gives them its pages, and only the uncached
   rest is prefilled. The head of the queue is never skipped for a smaller one behind it, so a large request
   cannot starve. A sequence that can never fit (longer than `max_seq_len` or the
   whole pool) is finished instead, so nothing waits forever.

What `plan` mutates, and nothing else: the KV cache (pages held, freed, indexed, moved between tiers) and, on the
sequences it is given, `status`, `block_table`, `num_computed_tokens` (advanced by every planned chunk, so a chunk's
KV counts as computed once planned; reset to 0 on preemption), `num_preemptions`, `error`, `page_keys` and
`cached_tokens`. The queues passed in are not modified; the
plan returns the new ones, and drops finished sequences (e.g. aborted between steps) from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from jaxserve.kv.cache import KVCache
from jaxserve.sequence import Sequence, SequenceStatus

PREEMPTION_MODES = ("auto", "swap", "recompute")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits of the scheduler."""

    # Sequences running at once, hence the most rows in one decode step.
    max_batch: int = 8
    # Tokens computed per step: one per decode row plus every prefill chunk's length.
    max_step_tokens: int = 512
    # Longest prefill chunk (the largest prefill bucket of the runner).
    max_chunk: int = 256
    # Tokens one sequence may hold in the KV pool (the block-table width times the page size).
    max_seq_len: int = 512
    # How a preempted sequence gets its KV back: "swap", "recompute", or "auto" (swap from swap_min_tokens on).
    # Swap needs a host tier and falls back to recompute without one.
    preemption: str = "auto"
    swap_min_tokens: int = 64
    # Static batching (for comparison only): a batch runs to its last token before anyone joins.
    static_batching: bool = False

    def __post_init__(self) -> None:
        for f in ("max_batch", "max_step_tokens", "max_chunk", "max_seq_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"scheduler.{f}: must be >= 1, got {getattr(self, f)}")
        if self.max_step_tokens < self.max_batch:
            raise ValueError(f"scheduler.max_step_tokens: must be >= max_batch={self.max_batch} so every running "
                             f"sequence can decode each step, got {self.max_step_tokens}")
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(f"scheduler.preemption: must be one of {PREEMPTION_MODES}, got {self.preemption!r}")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Tokens start..start+length-1 of `seq` to compute this step.

    `samples` is set when the chunk ends at the sequence's newest token: the token the runner samples after it is
    the sequence's next token. Otherwise (a prefill chunk short of the end) the sampled token is discarded.
    """

    seq: Sequence
    start: int
    length: int
    samples: bool


@dataclasses.dataclass
class StepPlan:
    """What to run next: decode rows (one token each, one runner call) and prefill chunks, plus what changed."""

    decode: list[Chunk] = dataclasses.field(default_factory=list)
    prefill: list[Chunk] = dataclasses.field(default_factory=list)
    # Lost their pages this step; they are in `waiting` again.
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    # Finished by the scheduler this step (could never fit); pages already freed, the engine reports them.
    finished: list[Sequence] = dataclasses.field(default_factory=list)
    # The queues after this step, most important first: replace the caller's.
    running: list[Sequence] = dataclasses.field(default_factory=list)
    waiting: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens computed by this step."""
        return len(self.decode) + sum(c.length for c in self.prefill)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to run."""
        return not self.decode and not self.prefill


def _rank(seq: Sequence) -> tuple[int, float]:
    """Sort key: most important first (lower priority number, then earlier arrival)."""
    return seq.priority, seq.arrival_time


class Scheduler:
    """Plans steps under a `SchedulerConfig`; holds no state between steps."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def plan(self, waiting: Iterable[Sequence], running: Iterable[Sequence], cache: KVCache) -> StepPlan:
        """Plans the next step; see the module docstring for the policy and exactly what this mutates."""
        cfg = self.config
        plan = StepPlan()
        budget = cfg.max_step_tokens
        queue = sorted((s for s in running if not s.is_finished), key=_rank)
        pending = sorted((s for s in waiting if not s.is_finished), key=_rank)

        # 1. Decode rows. Everything behind index i is unscheduled, so victims come off the end of the queue.
        i = 0
        while i < len(queue) and budget > 0:
            seq = queue[i]
            if seq.num_uncomputed != 1 or self._ends_with_pending(seq, cache):
                i += 1
            elif self._reject_if_outgrown(seq, cache, plan):
                queue.pop(i)
            elif cache.grow(seq, seq.num_tokens):
                budget -= self._schedule(seq, 1, plan, cache)
                i += 1
            else:
                victim = queue.pop()
                self.preempt(victim, cache)
                plan.preempted.append(victim)

        # 2. Prefill chunks of running sequences; their pages were reserved at admission.
        for seq in queue:
            if budget == 0:
                break
            if seq.num_uncomputed > 1:
                budget -= self._schedule(seq, min(seq.num_uncomputed, cfg.max_chunk, budget), plan, cache)

        # 3. Admission, in order, stopping at the first sequence that does not fit.
        admitted: list[Sequence] = []
        closed = cfg.static_batching and bool(queue)
        while (pending and not closed and not plan.preempted and budget > 0
               and len(queue) + len(admitted) < cfg.max_batch):
            seq = pending[0]
            if self._reject_if_outgrown(seq, cache, plan):
                pending.pop(0)
                continue
            if not cache.admit(seq):
                break
            pending.pop(0)
            seq.status = SequenceStatus.RUNNING
            budget -= self._schedule(seq, min(seq.num_uncomputed, cfg.max_chunk, budget), plan, cache)
            admitted.append(seq)

        plan.running = queue + admitted
        plan.waiting = sorted(plan.preempted + pending, key=_rank)
        return plan

    def finish(self, seq: Sequence, cache: KVCache, status: SequenceStatus, error: str | None = None) -> None:
        """Ends `seq` with a FINISHED_* status and frees its pages at once; the next plan drops it from the queues."""
        if not status.is_finished:
            raise ValueError(f"status: must be a FINISHED_* status, got {status.name}")
        if seq.is_finished:
            raise ValueError(f"request {seq.request_id!r} already finished ({seq.status.name})")
        cache.release(seq)
        seq.drop_pending()
        seq.status = status
        seq.error = error

    def abort(self, seq: Sequence, cache: KVCache) -> None:
        """Cancels `seq` and frees its pages at once; a no-op if it already finished (cancel raced completion)."""
        if not seq.is_finished:
            self.finish(seq, cache, SequenceStatus.FINISHED_CANCELLED)

    def capacity(self, cache: KVCache) -> int:
        """Most tokens one sequence can ever hold: max_seq_len, or the whole pool if smaller."""
        return min(self.config.max_seq_len, cache.allocator.num_usable * cache.page_size)

    def preempt(self, seq: Sequence, cache: KVCache, allow_swap: bool = True) -> None:
        """Takes a running sequence's pages back, by swap or recompute (see the module docstring); the caller queues
        it again. `allow_swap=False` when its KV is lost anyway (the pool was rebuilt)."""
        swap = allow_swap and cache.can_swap and (self.config.preemption == "swap" or (
            self.config.preemption == "auto" and seq.num_computed_tokens >= self.config.swap_min_tokens))
        if swap:
            cache.swap_out(seq)
        else:
            cache.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1

    # ----- steps of the policy -----

    def _schedule(self, seq: Sequence, length: int, plan: StepPlan, cache: KVCache) -> int:
        """Plans tokens num_computed..num_computed+length-1 of `seq`; returns the budget they use."""
        start = seq.num_computed_tokens
        chunk = Chunk(seq, start, length, samples=start + length == seq.num_tokens)
        seq.num_computed_tokens += length
        cache.commit(seq, start)
        (plan.decode if length == 1 and chunk.samples else plan.prefill).append(chunk)
        return length

    def _ends_with_pending(self, seq: Sequence, cache: KVCache) -> bool:
        """Whether the token still being sampled for `seq` (asynchronous scheduling) is its last: its max_tokens-th,
        or one past what it can hold. Decoding it would be wasted, and finishing it now would lose that token: the
        engine finishes it when the token arrives."""
        return bool(seq.num_pending) and (seq.num_output_tokens >= seq.options.max_tokens
                                          or seq.num_tokens > self.capacity(cache))

    def _reject_if_outgrown(self, seq: Sequence, cache: KVCache, plan: StepPlan) -> bool:
        """Finishes a sequence longer than it can ever be held: an error for a bare prompt, else a length stop."""
        limit = self.capacity(cache)
        if seq.num_tokens <= limit:
            return False
        if seq.num_output_tokens == 0:
            self.finish(seq, cache, SequenceStatus.FINISHED_ERROR,
                        f"prompt of {seq.num_tokens} tokens exceeds the {limit}-token limit (max_seq_len="
                        f"{self.config.max_seq_len}, KV pool of {cache.allocator.num_usable} pages of "
                        f"{cache.page_size})")
        else:
            self.finish(seq, cache, SequenceStatus.FINISHED_LENGTH)
        plan.finished.append(seq)
        return True
