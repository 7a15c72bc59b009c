"""The async load driver: replays a Workload against a server over gRPC and times every streamed token.

Conversations arrive as a Poisson process at `request_rate` per second (infinite: all at t=0), with at most
`concurrency` in flight (0: no cap; a cap with an infinite rate is a closed loop of `concurrency` clients). The turns
of one conversation run back to back, each sent once the previous reply is complete. TTFT is timed from sending a
request to its first streamed token, ITL between consecutive streamed token messages. A failed request (any gRPC
error) becomes a record carrying its status code, and the later turns of its conversation records with status
SKIPPED; nothing here raises for a request's failure. No statistics: see `report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import grpc
import numpy as np
from tqdm.auto import tqdm

from jaxserve.bench.workload import Conversation, Prompt, Workload
from jaxserve.client import AsyncClient, Delta

OK = "OK"
# Status of the turns that were never sent because an earlier turn of their conversation failed.
SKIPPED = "SKIPPED"
# Status of a stream that ended without an error and without a finish reason.
INCOMPLETE = "INCOMPLETE"


class StreamingClient(Protocol):
    """What the driver needs from a client: `AsyncClient.generate`'s shape."""

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                 **options: object) -> AsyncIterator[Delta]:
        """Streams the deltas of one request."""
        ...


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """How requests are sent: arrivals, the in-flight cap, and the sampling options every request carries."""

    request_rate: float = math.inf  # conversations per second (Poisson); inf sends all at t=0
    concurrency: int = 0  # conversations in flight at most; 0: unlimited
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0  # of the arrival times
    timeout_s: float | None = None  # deadline of each request

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), got {self.request_rate}")
        if self.concurrency < 0:
            raise ValueError(f"concurrency must be >= 0 (0: unlimited), got {self.concurrency}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    def arrival_times(self, num_conversations: int) -> np.ndarray:
        """Seconds after the start at which each conversation arrives, [num_conversations], non-decreasing."""
        if math.isinf(self.request_rate):
            return np.zeros(num_conversations)
        gaps = np.random.default_rng(self.seed).exponential(1.0 / self.request_rate, num_conversations)
        return np.cumsum(gaps) - gaps[0]  # the first arrives at once


@dataclasses.dataclass
class RequestRecord:
    """What one request did, timed on the client. Times are seconds; `start_s` is relative to the run's start."""

    conversation: int
    turn: int
    prompt_tokens: int  # the server's count (BOS included) once known, else the ids sent, else 0
    max_tokens: int | None
    # Prompt tokens the server served from its KV cache, by tier ("device", "host", "disk"), once known.
    cached_tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0
    output_ids: list[int] = dataclasses.field(default_factory=list)  # what was generated (compare systems' outputs)
    finish_reason: str | None = None
    status: str = OK
    error: str = ""

    @property
    def is_ok(self) -> bool:
        """Whether the request completed (a finish reason arrived and no error)."""
        return self.status == OK

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output tokens - 1); None below two tokens."""
        if not self.is_ok or self.output_tokens < 2 or self.e2e_s is None or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def token_times_s(self) -> list[float]:
        """When each streamed token message arrived, in seconds since the run's start."""
        if self.ttft_s is None:
            return []
        first = self.start_s + self.ttft_s
        return [first, *(first + float(t) for t in np.cumsum(self.itl_s))]


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """Every request's record (conversation order, then turn order) and the run's wall time."""

    records: list[RequestRecord]
    duration_s: float


async def _send(client: StreamingClient, prompt: Prompt, record: RequestRecord, spec: LoadSpec,
                t0: float) -> list[int] | str:
    """Sends one request, filling `record` in; returns the reply (ids for id prompts, text for text prompts)."""
    reply_ids: list[int] = []
    reply_text: list[str] = []
    start = time.perf_counter()
    record.start_s = start - t0
    last = start
    try:
        async for delta in client.generate(prompt, timeout=spec.timeout_s, max_tokens=record.max_tokens,
                                           temperature=spec.temperature, ignore_eos=spec.ignore_eos):
            now = time.perf_counter()
            if delta.token_ids:
                if record.ttft_s is None:
                    record.ttft_s = now - start
                else:
                    record.itl_s.append(now - last)
                last = now
                reply_ids.extend(delta.token_ids)
            reply_text.append(delta.text)
            if delta.usage is not None:
                u = delta.usage
                record.prompt_tokens = u.prompt_tokens
                record.cached_tokens = {"device": u.cached_device, "host": u.cached_host, "disk": u.cached_disk}
            if delta.finish_reason is not None:
                record.finish_reason = delta.finish_reason
        record.e2e_s = time.perf_counter() - start
        if record.finish_reason is None:
            record.status, record.error = INCOMPLETE, "the stream ended without a finish reason"
        elif record.finish_reason == "cancelled":  # the server gave up on it (e.g. its shutdown grace ran out)
            record.status, record.error = grpc.StatusCode.CANCELLED.name, "the server cancelled the request"
    except grpc.RpcError as e:  # grpc.aio.AioRpcError included
        code = e.code() if hasattr(e, "code") else None
        record.status = code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN.name
        record.error = str(e.details()) if hasattr(e, "details") else str(e)
    record.output_tokens, record.output_ids = len(reply_ids), reply_ids
    return "".join(reply_text) if isinstance(prompt, str) else reply_ids


async def _converse(client: StreamingClient, index: int, conversation: Conversation, spec: LoadSpec, t0: float,
                    records: list[RequestRecord], on_record: Callable[[RequestRecord], None]) -> None:
    """Runs the turns of one conversation in order, each prompt extending the previous prompt and reply."""
    history: Prompt = conversation.system
    failed = False
    for turn_index, turn in enumerate(conversation.turns):
        prompt = history + turn.content  # type: ignore[operator]  # both str or both tuple (Conversation checks)
        record = RequestRecord(index, turn_index, len(prompt) if isinstance(prompt, tuple) else 0, turn.max_tokens)
        if failed:
            record.status, record.error = SKIPPED, "an earlier turn of this conversation failed"
        else:
            reply = await _send(client, prompt, record, spec, t0)
            failed = not record.is_ok
            history = prompt + (reply if isinstance(reply, str) else tuple(reply))  # type: ignore[operator]
        records.append(record)
        on_record(record)


async def drive(client: StreamingClient, workload: Workload, spec: LoadSpec,
                on_record: Callable[[RequestRecord], None] = lambda r: None) -> LoadResult:
    """Replays `workload` through `client` under `spec`; `on_record` sees each request as it finishes."""
    arrivals = spec.arrival_times(len(workload.conversations))
    limit = asyncio.Semaphore(spec.concurrency) if spec.concurrency else None
    per_conversation: list[list[RequestRecord]] = [[] for _ in workload.conversations]
    t0 = time.perf_counter()

    async def run(index: int) -> None:
        delay = t0 + arrivals[index] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the arrival schedule itself, not synchronisation
        async with limit or contextlib.nullcontext():
            await _converse(client, index, workload.conversations[index], spec, t0, per_conversation[index],
                            on_record)

    await asyncio.gather(*(run(i) for i in range(len(workload.conversations))))
    duration = time.perf_counter() - t0
    return LoadResult([r for records in per_conversation for r in records], duration)


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where the server is and how to reach it."""

    target: str = "127.0.0.1:50051"
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None


def run_load(connection: Connection, workload: Workload, spec: LoadSpec, progress: bool = True) -> LoadResult:
    """Runs `drive` on a fresh event loop with one AsyncClient; with `progress`, a tqdm bar counts finished
    requests and failures."""

    async def main() -> LoadResult:
        bar = tqdm(total=workload.num_requests, unit="req", disable=not progress, dynamic_ncols=True)
        failed = 0

        def on_record(record: RequestRecord) -> None:
            nonlocal failed
            failed += not record.is_ok
            bar.update(1)
            if failed:
                bar.set_postfix(failed=failed)

        try:
            async with AsyncClient(connection.target, token=connection.token, tls=connection.tls,
                                   root_certificates=connection.root_certificates) as client:
                return await drive(client, workload, spec, on_record)
        finally:
            bar.close()

    return asyncio.run(main())
