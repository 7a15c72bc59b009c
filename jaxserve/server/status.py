"""The one place exceptions become gRPC status codes; every RPC handler is wrapped with `rpc_errors`.

Handlers raise domain errors (a bad field, a full queue, a draining server, a failed request) and never pick a status
code themselves, so the same failure always reaches clients with the same code.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from absl import logging

from jaxserve.engine import EngineStoppedError, QueueFullError


class InvalidRequestError(ValueError):
    """A request field is missing, malformed or out of range; the message starts with the field's name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class UnavailableError(RuntimeError):
    """The server is warming up or draining and takes no new work."""


class DuplicateRequestError(RuntimeError):
    """A client-chosen request id is already in flight."""


class RequestFailedError(RuntimeError):
    """The engine ended a request with an error (a failed step, or the engine loop died)."""


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and details clients see for `error`."""
    if isinstance(error, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{error}; retry later"
    if isinstance(error, UnavailableError | EngineStoppedError):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, DuplicateRequestError):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, RequestFailedError):
        return grpc.StatusCode.INTERNAL, str(error)
    logging.exception("unexpected error in an RPC handler")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def rpc_errors(handler: Handler) -> Handler:
    """Wraps an async RPC method (`self, request, context`) so that exceptions end the RPC with `status_for`'s code.

    Cancellation (a client that went away or a passed deadline) is not an error and propagates untouched.
    """

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # every other failure becomes a status, never a dropped connection
            code, details = status_for(e)
            await context.abort(code, details)

    return wrapped  # type: ignore[return-value]
