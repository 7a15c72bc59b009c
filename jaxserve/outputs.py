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
    """Token counts of a finished request (`cached_tokens`: prompt tokens served from the KV cache)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
