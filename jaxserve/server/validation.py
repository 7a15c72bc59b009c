"""Request intake at the edge: wire requests -> validated engine `Request`s, or an error naming the bad field.

Everything a request can get wrong is caught here, before anything reaches the engine: prompt shape and length,
ids outside the vocabulary, sampling knobs, stops, logprobs, limits. Pure functions of the request, the limits and the
tokenizer; no engine, no gRPC status codes (`status` maps `InvalidRequestError` to INVALID_ARGUMENT).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from jaxserve.config import Config
from jaxserve.engine import Request
from jaxserve.proto import jaxserve_pb2, jetstream_pb2
from jaxserve.sequence import SamplingOptions
from jaxserve.server.status import InvalidRequestError
from jaxserve.tokenizer import Tokenizer

REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Stops are checked on every generated token, and a stop string holds back that much streamed text: keep both small.
MAX_STOP_TOKEN_IDS = 64
MAX_STOP_STRING_CHARS = 256
SEED_LIMIT = 2**32


@dataclasses.dataclass(frozen=True)
class Limits:
    """The request limits one replica enforces, resolved from its config (0 in ServerConfig means "derive")."""

    vocab_size: int
    max_seq_len: int
    max_prompt_tokens: int
    max_tokens_cap: int
    max_logprobs: int
    max_stop_strings: int
    max_samples: int
    bos_id: int | None

    @classmethod
    def from_config(cls, config: Config, tokenizer: Tokenizer) -> Limits:
        """Limits of `config`; a prompt always leaves room for at least one generated token."""
        s, r = config.server, config.runner
        bos = config.model.bos_token_id if config.model.bos_token_id >= 0 else tokenizer.bos_id
        return cls(
            vocab_size=config.model.vocab_size,
            max_seq_len=r.max_seq_len,
            max_prompt_tokens=min(s.max_prompt_tokens or r.max_seq_len, r.max_seq_len - 1),
            max_tokens_cap=min(s.max_tokens_cap or r.max_seq_len, r.max_seq_len),
            max_logprobs=r.max_logprobs,
            max_stop_strings=s.max_stop_strings,
            max_samples=r.max_batch,
            bos_id=bos,
        )


class RequestValidator:
    """Checks and converts requests of both APIs against one replica's limits and tokenizer."""

    def __init__(self, limits: Limits, tokenizer: Tokenizer) -> None:
        self.limits = limits
        self.tokenizer = tokenizer

    # ----- jaxserve.v1 -----

    def generate(self, msg: jaxserve_pb2.GenerateRequest, request_id: str) -> Request:
        """The engine request for a `GenerateRequest`; raises InvalidRequestError naming the first bad field."""
        self.request_id(msg.request_id)
        if msg.text and msg.token_ids:
            raise InvalidRequestError("token_ids", "give the prompt as text or as token_ids, not both")
        if msg.text:
            prompt = self._prompt(self.tokenizer.encode(msg.text), add_bos=not msg.skip_bos, field="text")
        elif msg.token_ids:
            prompt = self._prompt(list(msg.token_ids), add_bos=False, field="token_ids")
        else:
            raise InvalidRequestError("text", "the prompt is empty: set text or token_ids")
        max_tokens = self._max_tokens(msg.max_tokens if msg.HasField("max_tokens") else None, len(prompt))
        if not math.isfinite(msg.temperature) or msg.temperature < 0:
            raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {msg.temperature}")
        if msg.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables it), got {msg.top_k}")
        top_p = msg.top_p if msg.HasField("top_p") else 1.0
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {top_p}")
        seed = msg.seed if msg.HasField("seed") else None
        if seed is not None and not 0 <= seed < SEED_LIMIT:
            raise InvalidRequestError("seed", f"must be in [0, 2**32), got {seed}")
        if not 0 <= msg.logprobs <= self.limits.max_logprobs:
            raise InvalidRequestError("logprobs", f"must be in [0, {self.limits.max_logprobs}], got {msg.logprobs}")
        stop_token_ids, stop = self._stop_token_ids(msg.stop_token_ids), self._stop_strings(msg.stop)
        try:
            options = SamplingOptions(
                temperature=msg.temperature, top_k=msg.top_k, top_p=top_p, seed=seed, max_tokens=max_tokens,
                stop_token_ids=stop_token_ids, stop=stop, logprobs=msg.logprobs, ignore_eos=msg.ignore_eos)
        except ValueError as e:  # SamplingOptions' own checks; its messages start with the field name
            field, _, problem = str(e).partition(": ")
            raise InvalidRequestError(field, problem) from e
        return Request(request_id, prompt, options, priority=msg.priority)

    def tokenize(self, msg: jaxserve_pb2.TokenizeRequest) -> list[int]:
        """Token ids of a `TokenizeRequest`'s text."""
        ids = self.tokenizer.encode(msg.text)
        return [self.limits.bos_id, *ids] if msg.add_bos and self.limits.bos_id is not None else ids

    def request_id(self, request_id: str) -> None:
        """Checks a client-chosen request id (empty means the server picks one)."""
        if request_id and not REQUEST_ID.fullmatch(request_id):
            raise InvalidRequestError(
                "request_id", f"must be 1-128 characters of [A-Za-z0-9._:-] starting with a letter or digit, "
                f"got {request_id[:140]!r}")

    # ----- jetstream_proto -----

    def decode(self, msg: jetstream_pb2.DecodeRequest,
               options: SamplingOptions) -> tuple[list[int], int, SamplingOptions]:
        """(prompt ids, number of samples, sampling options) of a JetStream `DecodeRequest`.

        `options` holds the server's sampling defaults for JetStream clients, which cannot send their own.
        """
        if msg.lora_adapter_id:
            raise InvalidRequestError("lora_adapter_id", f"no LoRA adapters are loaded, got {msg.lora_adapter_id!r}")
        content = msg.WhichOneof("content")
        if content == "text_content" and msg.text_content.text:
            ids, field = self.tokenizer.encode(msg.text_content.text), "text_content.text"
        elif content == "token_content" and msg.token_content.token_ids:
            ids, field = list(msg.token_content.token_ids), "token_content.token_ids"
        else:
            raise InvalidRequestError("content", "the prompt is empty: set text_content or token_content")
        bos_first = bool(ids) and ids[0] == self.limits.bos_id
        prompt = self._prompt(ids, add_bos=not msg.has_bos and not bos_first, field=field)
        max_tokens = self._max_tokens(msg.max_tokens, len(prompt))
        num_samples = msg.num_samples or 1
        if not 1 <= num_samples <= self.limits.max_samples:
            raise InvalidRequestError("num_samples", f"must be in [1, {self.limits.max_samples}], got {num_samples}")
        return prompt, num_samples, dataclasses.replace(options, max_tokens=max_tokens)

    # ----- shared checks -----

    def _prompt(self, ids: list[int], add_bos: bool, field: str) -> list[int]:
        vocab = self.limits.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise InvalidRequestError(f"{field}[{i}]" if field.endswith("ids") else field,
                                          f"token id {t} is outside the vocabulary [0, {vocab})")
        if add_bos and self.limits.bos_id is not None:
            ids = [self.limits.bos_id, *ids]
        if not ids:
            raise InvalidRequestError(field, "the prompt is empty")
        if len(ids) > self.limits.max_prompt_tokens:
            raise InvalidRequestError(field, f"the prompt is {len(ids)} tokens, over the limit of "
                                      f"{self.limits.max_prompt_tokens}")
        return ids

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        cap = self.limits.max_tokens_cap
        if requested is None:
            return min(cap, self.limits.max_seq_len - prompt_len)
        if not 1 <= requested <= cap:
            raise InvalidRequestError("max_tokens", f"must be in [1, {cap}], got {requested}")
        return requested

    def _stop_token_ids(self, ids: Sequence[int]) -> tuple[int, ...]:
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        for t in ids:
            if not 0 <= t < self.limits.vocab_size:
                raise InvalidRequestError("stop_token_ids",
                                          f"token id {t} is outside the vocabulary [0, {self.limits.vocab_size})")
        return tuple(ids)

    def _stop_strings(self, stops: Sequence[str]) -> tuple[str, ...]:
        if len(stops) > self.limits.max_stop_strings:
            raise InvalidRequestError("stop", f"at most {self.limits.max_stop_strings} stop strings, got {len(stops)}")
        for s in stops:
            if not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError("stop", f"a stop string is {len(s)} characters, over the limit of "
                                          f"{MAX_STOP_STRING_CHARS}")
        return tuple(stops)
