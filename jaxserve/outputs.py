"""Plain records of generation results shared by the engine and the client (no JAX, no gRPC)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the top alternatives [(token id, logprob)], best first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts of a finished request; `cached_tokens` prompt tokens were served from the KV cache, of them
    `cached_device` found on the device, `cached_host` copied up from host DRAM and `cached_disk` read from disk."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cached_device: int = 0
    cached_host: int = 0
    cached_disk: int = 0
