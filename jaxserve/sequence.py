"""One request's tokens and scheduling state: what the scheduler plans over and the engine appends to.

Plain data, no JAX and no policy. The scheduler moves a sequence between states and owns `num_computed_tokens`,
`block_table` and `status`; the engine appends sampled tokens and finishes sequences (through the scheduler, which
also frees their pages).

With asynchronous scheduling the engine plans a step before the previous one's tokens reach the host: a token
being sampled on the device is held as a `PENDING` placeholder (at most two, at the end of the output), so the
plan sees the sequence's true length; the engine resolves each placeholder when its step's results arrive.
"""

from __future__ import annotations

import dataclasses
import enum
import time

# An output token still being sampled on the device (never a vocabulary id).
PENDING = -1


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Per-request generation knobs, validated at intake.

    temperature 0 means greedy; top_k 0 and top_p 1 mean no filter; seed None lets the engine pick one.
    `stop` strings are matched by the engine on detokenized text; `stop_token_ids` and the model's EOS ids (unless
    `ignore_eos`) end a sequence on the token itself. `logprobs` is how many top alternatives to return per token.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: must be in [0, 2**32), got {self.seed}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: must be >= 0, got {list(self.stop_token_ids)}")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")
        if self.logprobs < 0:
            raise ValueError(f"logprobs: must be >= 0, got {self.logprobs}")


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life; the FINISHED_* members carry the reason it ended."""

    WAITING = "waiting"  # queued, holds no pages, nothing computed
    RUNNING = "running"  # admitted: holds pages, gets prefill chunks or a decode row each step
    PREEMPTED = "preempted"  # back in the waiting queue after losing its pages; prompt + output are recomputed
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens, or the sequence outgrew max_seq_len / the KV pool
    FINISHED_CANCELLED = "cancelled"  # the client went away or cancelled
    FINISHED_ERROR = "error"  # rejected (e.g. a prompt that can never fit) or failed inside a step

    @property
    def is_finished(self) -> bool:
        """True for every FINISHED_* status."""
        return self.name.startswith("FINISHED_")


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request's prompt, its generated tokens so far, and the state the scheduler keeps for it.

    `num_computed_tokens` counts the leading tokens whose KV is in the pool, or is written by the step the
    scheduler has already planned (the scheduler advances it when it plans a chunk). `block_table` lists the pages
    holding those tokens in order: token i lives in page `block_table[i // page_size]`. Equality is identity, so
    sequences can key dicts and sets.
    """

    request_id: str
    prompt_token_ids: list[int]
    options: SamplingOptions = SamplingOptions()
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    # Lower runs first; ties go to the earlier arrival.
    priority: int = 0
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    error: str | None = None
    num_preemptions: int = 0
    # Prefix-cache keys of the leading full pages (page i covers tokens [0, (i+1) * page_size)), filled lazily.
    page_keys: list[bytes] = dataclasses.field(default_factory=list)
    # Prompt tokens served from the KV cache at first admission, by tier ("device", "host", "disk").
    cached_tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    # PENDING placeholders at the end of output_token_ids.
    num_pending: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids must hold at least one token")
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far, placeholders of tokens still being sampled included."""
        return len(self.output_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Leading tokens whose ids are known: all but the pending placeholders at the end."""
        return self.num_tokens - self.num_pending

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens not yet in the KV pool: the rest of the prompt while prefilling, 1 when ready to decode."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def token_ids(self) -> list[int]:
        """Prompt then output tokens (a new list); a recompute after preemption prefills all of them."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token(self) -> int:
        """The newest token: the input of the next decode step."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        """True once the sequence has ended for any reason."""
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """The reason it ended ("stop", "length", "cancelled" or "error"), or None while it is live."""
        return self.status.value if self.status.is_finished else None

    def append_token(self, token_id: int) -> None:
        """Appends a sampled token; its KV is written by the next step that computes it."""
        self.output_token_ids.append(token_id)

    def append_pending(self) -> int:
        """Appends the placeholder of a token a dispatched step is sampling; returns its index in the output."""
        self.output_token_ids.append(PENDING)
        self.num_pending += 1
        return len(self.output_token_ids) - 1

    def resolve(self, index: int, token_id: int) -> None:
        """Replaces the placeholder at output `index` with the token its step sampled."""
        if self.output_token_ids[index] != PENDING:
            raise ValueError(f"request {self.request_id!r}: output token {index} is not pending")
        self.output_token_ids[index] = token_id
        self.num_pending -= 1

    def drop_pending(self) -> None:
        """Forgets the tokens still being sampled (the sequence ended): their results will be discarded."""
        if self.num_pending:
            del self.output_token_ids[-self.num_pending:]
            self.num_pending = 0
