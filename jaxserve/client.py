"""Python client of the `jaxserve.v1` API: streaming generate, tokenize and model info, sync and asyncio.

    with Client("127.0.0.1:50051") as client:
        for delta in client.generate("def fib(n):", max_tokens=64):
            print(delta.text, end="")

Needs only grpc and the generated stubs (no JAX). TLS and a bearer token are optional. Leaving a `generate` loop early
cancels the RPC, so the server frees the request's pages at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from jaxserve.outputs import TokenLogprob, Usage
from jaxserve.proto import jaxserve_pb2, jaxserve_pb2_grpc

_FINISH_REASONS = {
    jaxserve_pb2.FINISH_REASON_UNSPECIFIED: None,
    jaxserve_pb2.FINISH_REASON_STOP: "stop",
    jaxserve_pb2.FINISH_REASON_LENGTH: "length",
    jaxserve_pb2.FINISH_REASON_CANCELLED: "cancelled",
    jaxserve_pb2.FINISH_REASON_ERROR: "error",
}


@dataclasses.dataclass(frozen=True)
class Delta:
    """One streamed message: new token ids and text; the last one has `finish_reason` and `usage`."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    error: str
    usage: Usage | None

    @classmethod
    def from_proto(cls, msg: jaxserve_pb2.GenerateResponse) -> Delta:
        """The client-side form of a GenerateResponse."""
        return cls(
            request_id=msg.request_id, token_ids=list(msg.token_ids), text=msg.text,
            logprobs=[TokenLogprob(lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for lp in msg.logprobs],
            finish_reason=_FINISH_REASONS[msg.finish_reason], error=msg.error,
            usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens,
                        msg.usage.cached_device_tokens, msg.usage.cached_host_tokens, msg.usage.cached_disk_tokens)
            if msg.HasField("usage") else None)


def generate_request(prompt: str | Sequence[int], *, max_tokens: int | None = None, temperature: float = 0.0,
                     top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                     stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                     logprobs: int = 0, priority: int = 0, skip_bos: bool = False,
                     request_id: str = "") -> jaxserve_pb2.GenerateRequest:
    """A GenerateRequest: `prompt` is text (tokenized by the server) or token ids; None leaves a field to the server."""
    msg = jaxserve_pb2.GenerateRequest(
        request_id=request_id, skip_bos=skip_bos, temperature=temperature, top_k=top_k, stop=list(stop),
        stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, logprobs=logprobs, priority=priority)
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.extend(prompt)
    if max_tokens is not None:
        msg.max_tokens = max_tokens
    if top_p is not None:
        msg.top_p = top_p
    if seed is not None:
        msg.seed = seed
    return msg


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _options(server_name: str | None) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


class Client:
    """Blocking client. `tls` (or `root_certificates`, PEM bytes) enables TLS; `token` sends a bearer token;
    `server_name` overrides the name checked against the server's certificate."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, server_name: str | None = None) -> None:
        creds = _credentials(tls, root_certificates)
        options = _options(server_name)
        self._channel = (grpc.secure_channel(target, creds, options) if creds is not None
                         else grpc.insecure_channel(target, options))
        self._stub = jaxserve_pb2_grpc.JaxServeStub(self._channel)
        self._metadata = _metadata(token)

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None, **options: Any
                 ) -> Iterator[Delta]:
        """Streams deltas for `prompt`; `options` are `generate_request`'s keywords. Raises grpc.RpcError."""
        call = self._stub.Generate(generate_request(prompt, **options), timeout=timeout,
                                   metadata=self._metadata)
        try:
            for msg in call:
                yield Delta.from_proto(msg)
        finally:
            call.cancel()  # a no-op once the stream ended; frees the server's pages when the caller stops early

    def tokenize(self, text: str, add_bos: bool = False, timeout: float | None = None) -> list[int]:
        """The server tokenizer's ids for `text`."""
        reply = self._stub.Tokenize(jaxserve_pb2.TokenizeRequest(text=text, add_bos=add_bos), timeout=timeout,
                                    metadata=self._metadata)
        return list(reply.token_ids)

    def model_info(self, timeout: float | None = None) -> jaxserve_pb2.ModelInfo:
        """The served model, its limits and layout."""
        return self._stub.GetModelInfo(jaxserve_pb2.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same surface as `Client` (create it inside a running event loop)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, server_name: str | None = None) -> None:
        creds = _credentials(tls, root_certificates)
        options = _options(server_name)
        self._channel = (grpc.aio.secure_channel(target, creds, options) if creds is not None
                         else grpc.aio.insecure_channel(target, options))
        self._stub = jaxserve_pb2_grpc.JaxServeStub(self._channel)
        self._metadata = _metadata(token)

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None, **options: Any
                       ) -> AsyncIterator[Delta]:
        """Streams deltas for `prompt`; `options` are `generate_request`'s keywords. Raises grpc.aio.AioRpcError."""
        call = self._stub.Generate(generate_request(prompt, **options), timeout=timeout,
                                   metadata=self._metadata)
        try:
            async for msg in call:
                yield Delta.from_proto(msg)
        finally:
            call.cancel()

    async def tokenize(self, text: str, add_bos: bool = False, timeout: float | None = None) -> list[int]:
        """The server tokenizer's ids for `text`."""
        reply = await self._stub.Tokenize(jaxserve_pb2.TokenizeRequest(text=text, add_bos=add_bos),
                                          timeout=timeout, metadata=self._metadata)
        return list(reply.token_ids)

    async def model_info(self, timeout: float | None = None) -> jaxserve_pb2.ModelInfo:
        """The served model, its limits and layout."""
        return await self._stub.GetModelInfo(jaxserve_pb2.GetModelInfoRequest(), timeout=timeout,
                                             metadata=self._metadata)

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
