"""Connects asyncio RPC handlers to the engine thread: submit, stream outputs back, cancel when the RPC ends early.

The engine calls a request's sink on its own thread and the sink must not block, so each sink hands outputs to the
handler's event loop with `call_soon_threadsafe`. Leaving an `OutputStream` before its final output (the client
cancelled or disconnected, the deadline passed, the handler failed) cancels the request, which frees its pages before
the engine's next step. The bridge also counts requests in flight, which graceful shutdown and tests wait on.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import uuid
from collections.abc import Callable
from types import TracebackType

from jaxserve.engine import Engine, Request, RequestOutput
from jaxserve.outputs import Usage
from jaxserve.server.status import DuplicateRequestError, UnavailableError


class ServingState(enum.Enum):
    """Whether the replica takes new requests."""

    STARTING = "starting"  # warming up: health NOT_SERVING, RPCs UNAVAILABLE
    SERVING = "serving"
    DRAINING = "draining"  # shutting down or the engine died: in-flight requests finish, new ones are refused


def new_request_id() -> str:
    """A fresh server-assigned request id."""
    return uuid.uuid4().hex


class OutputStream:
    """One submitted request's outputs as an async iterator; a context manager that cancels it if left early.

    Use as `with bridge.open(request) as outputs: async for out in outputs: ...`; iteration ends after the output
    that carries `finish_reason`.
    """

    def __init__(self, bridge: EngineBridge, request: Request) -> None:
        self.request = request
        self._bridge = bridge
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.is_finished = False
        self.num_generated = 0

    def _sink(self, out: RequestOutput) -> None:
        """Runs on the engine thread: never blocks and never raises (a raise would take down the engine loop)."""
        self.num_generated += len(out.token_ids)
        if out.finish_reason is not None:
            self._bridge._release(self.request.request_id)
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.is_finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self.is_finished = out.finish_reason is not None
        return out

    def __enter__(self) -> OutputStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.is_finished:
            self._bridge.engine.cancel(self.request.request_id)


class EngineBridge:
    """The server's only door into the engine; thread-safe counters of what is in flight."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.state = ServingState.STARTING
        self._inflight: dict[str, OutputStream] = {}
        self._cond = threading.Condition()

    def require_serving(self) -> None:
        """Raises UnavailableError unless the replica takes new requests."""
        if self.state is ServingState.STARTING:
            raise UnavailableError("the server is warming up; retry shortly")
        if self.state is ServingState.DRAINING:
            raise UnavailableError("the server is shutting down and takes no new requests")

    def open(self, request: Request) -> OutputStream:
        """Submits `request` (on the event loop's thread) and returns its output stream.

        Raises UnavailableError, DuplicateRequestError, or the engine's QueueFullError / EngineStoppedError.
        """
        self.require_serving()
        rid = request.request_id
        stream = OutputStream(self, request)
        with self._cond:
            if rid in self._inflight:
                raise DuplicateRequestError(f"request_id {rid!r} is already in flight")
            self._inflight[rid] = stream
            self._cond.notify_all()
        try:
            self.engine.submit(request, stream._sink)
        except BaseException:
            self._release(rid)
            raise
        return stream

    def _release(self, request_id: str) -> None:
        with self._cond:
            self._inflight.pop(request_id, None)
            self._cond.notify_all()

    def end_abandoned(self) -> None:
        """After the engine loop has stopped: ends every stream still waiting with a final "cancelled" output.

        A shutdown whose grace period ran out stops the engine with requests unfinished; their clients get a last
        message and an OK status rather than a connection cut. Call on the event loop's thread.
        """
        with self._cond:
            streams = list(self._inflight.values())
        for stream in streams:
            r = stream.request
            stream._sink(RequestOutput(r.request_id, [], "", [], "cancelled",
                                       "the server shut down before the request finished",
                                       Usage(len(r.prompt_token_ids), stream.num_generated)))

    @property
    def num_inflight(self) -> int:
        """Requests submitted to the engine whose final output has not arrived yet."""
        with self._cond:
            return len(self._inflight)

    def wait_inflight(self, predicate: Callable[[int], bool], timeout: float | None = None) -> bool:
        """Blocks (any thread but the event loop's) until `predicate(num_inflight)` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(len(self._inflight)), timeout)
