"""Benchmark workloads: seeded synthetic prompts, prompts files and multi-turn conversations, as plain data.

A workload is a list of conversations; a single-turn workload is one turn per conversation. Turn k of a
conversation is sent as: system prompt + every earlier turn's content and reply + turn k's content, so later turns
share an ever longer prefix with earlier ones (what a KV prefix cache reuses). Everything here is deterministic given
the seed. No gRPC, no clocks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np

# A prompt is text (tokenized by the server) or token ids (sent as they are).
Prompt = str | tuple[int, ...]
LENGTH_KINDS = ("fixed", "uniform", "normal")


@dataclasses.dataclass(frozen=True)
class LengthDistribution:
    """Token counts drawn per request: `fixed` at `low`, `uniform` in [low, high], or `normal` (mean, std) rounded and
    clipped to >= 1.

    The text form, accepted by `parse` and given by `str`: "128" or "fixed:128", "uniform:64:512", "normal:256:64".
    """

    kind: str
    low: int = 1
    high: int = 1
    mean: float = 0.0
    std: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"length distribution kind must be one of {', '.join(LENGTH_KINDS)}, got {self.kind!r}")
        if self.kind == "normal":
            if not (self.mean >= 1 and self.std >= 0 and math.isfinite(self.mean) and math.isfinite(self.std)):
                raise ValueError(f"normal lengths need mean >= 1 and std >= 0, got mean={self.mean} std={self.std}")
        elif not 1 <= self.low <= self.high:
            raise ValueError(f"{self.kind} lengths need 1 <= low <= high, got low={self.low} high={self.high}")

    @classmethod
    def fixed(cls, n: int) -> LengthDistribution:
        """Always `n` tokens."""
        return cls("fixed", n, n)

    @classmethod
    def uniform(cls, low: int, high: int) -> LengthDistribution:
        """Uniform integers in [low, high]."""
        return cls("uniform", low, high)

    @classmethod
    def normal(cls, mean: float, std: float) -> LengthDistribution:
        """Normal(mean, std), rounded, at least 1."""
        return cls("normal", mean=mean, std=std)

    @classmethod
    def parse(cls, text: str) -> LengthDistribution:
        """"128" / "fixed:128", "uniform:64:512" or "normal:256:64"; raises ValueError saying what is expected."""
        parts = text.strip().split(":")
        expected = 'expected "N", "fixed:N", "uniform:MIN:MAX" or "normal:MEAN:STD"'
        try:
            if len(parts) == 1:
                return cls.fixed(int(parts[0]))
            kind, args = parts[0], parts[1:]
            if kind == "fixed" and len(args) == 1:
                return cls.fixed(int(args[0]))
            if kind == "uniform" and len(args) == 2:
                return cls.uniform(int(args[0]), int(args[1]))
            if kind == "normal" and len(args) == 2:
                return cls.normal(float(args[0]), float(args[1]))
        except ValueError as e:
            raise ValueError(f"bad length distribution {text!r}: {e}; {expected}") from e
        raise ValueError(f"bad length distribution {text!r}: {expected}")

    def __str__(self) -> str:
        if self.kind == "normal":
            return f"normal:{self.mean:g}:{self.std:g}"
        return f"fixed:{self.low}" if self.kind == "fixed" else f"uniform:{self.low}:{self.high}"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` lengths, int64 [n]."""
        if self.kind == "fixed":
            return np.full(n, self.low, np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high, size=n, endpoint=True)
        return np.maximum(np.rint(rng.normal(self.mean, self.std, size=n)), 1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Ids synthetic prompts are drawn from: [0, size) without `special_ids` (BOS, EOS), so a random prompt holds no
    control tokens."""

    size: int
    special_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.size - len(set(self.special_ids)) < 1:
            raise ValueError(f"a vocabulary of {self.size} ids without {len(self.special_ids)} special ones is empty")

    def sample(self, rng: np.random.Generator, n: int) -> tuple[int, ...]:
        """`n` uniformly drawn ordinary ids."""
        special = sorted({s for s in self.special_ids if 0 <= s < self.size})
        ids = rng.integers(0, self.size - len(special), size=n)
        for s in special:  # shift past each special id in increasing order: a bijection onto the ordinary ids
            ids[ids >= s] += 1
        return tuple(int(i) for i in ids)


@dataclasses.dataclass(frozen=True)
class Turn:
    """One request of a conversation: the new content it adds and the tokens to generate (None: server default)."""

    content: Prompt
    max_tokens: int | None


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A system prompt (empty for single requests) and turns sent one after another, each extending the last."""

    system: Prompt
    turns: tuple[Turn, ...]

    def __post_init__(self) -> None:
        if not self.turns:
            raise ValueError("a conversation needs at least one turn")
        if any(type(t.content) is not type(self.system) for t in self.turns):
            raise ValueError("a conversation's system prompt and turns must all be text or all be token ids")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a benchmark sends: conversations (single requests are one-turn conversations) and a description."""

    name: str
    conversations: tuple[Conversation, ...]

    @property
    def num_requests(self) -> int:
        """Requests in total: every turn of every conversation."""
        return sum(len(c.turns) for c in self.conversations)

    @property
    def max_turns(self) -> int:
        """Turns of the longest conversation."""
        return max((len(c.turns) for c in self.conversations), default=0)


def synthetic_workload(num_requests: int, input_len: LengthDistribution, output_len: LengthDistribution,
                       vocab: Vocabulary, seed: int = 0) -> Workload:
    """`num_requests` independent prompts of random ids, lengths drawn from `input_len` and `output_len`."""
    _check_count(num_requests)
    rng = np.random.default_rng(seed)
    prompt_lens, output_lens = input_len.sample(rng, num_requests), output_len.sample(rng, num_requests)
    conversations = tuple(Conversation((), (Turn(vocab.sample(rng, int(p)), int(o)),))
                          for p, o in zip(prompt_lens, output_lens, strict=True))
    return Workload(f"synthetic(input={input_len}, output={output_len}, seed={seed})", conversations)


def multiturn_workload(num_requests: int, turns: int, system_len: int, input_len: LengthDistribution,
                       output_len: LengthDistribution, vocab: Vocabulary, seed: int = 0) -> Workload:
    """Conversations of `turns` turns (the last one shorter when `turns` does not divide `num_requests`) sharing one
    system prompt of `system_len` random ids; each turn adds `input_len` new ids and asks for `output_len` tokens."""
    _check_count(num_requests)
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if system_len < 0:
        raise ValueError(f"system_len must be >= 0, got {system_len}")
    rng = np.random.default_rng(seed)
    system = vocab.sample(rng, system_len)
    prompt_lens, output_lens = input_len.sample(rng, num_requests), output_len.sample(rng, num_requests)
    flat = [Turn(vocab.sample(rng, int(p)), int(o)) for p, o in zip(prompt_lens, output_lens, strict=True)]
    conversations = tuple(Conversation(system, tuple(flat[i:i + turns])) for i in range(0, num_requests, turns))
    return Workload(f"multiturn(turns={turns}, system={system_len}, input={input_len}, output={output_len}, "
                    f"seed={seed})", conversations)


class PromptsFileError(ValueError):
    """A prompts file is missing, unreadable, or has an entry that is not {"prompt": ..., "max_tokens": ...}."""


@dataclasses.dataclass(frozen=True)
class PromptEntry:
    """One prompt of a prompts file."""

    prompt: Prompt
    max_tokens: int | None


def load_prompts_file(path: str) -> list[PromptEntry]:
    """Reads a JSON list or a JSONL file of objects with `prompt` (text or a list of token ids) and optional
    `max_tokens` (a positive integer); raises PromptsFileError naming the file, the entry and the problem."""
    if not os.path.isfile(path):
        raise PromptsFileError(f"prompts file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptsFileError(f"prompts file {path!r} is unreadable: {e}") from e
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptsFileError(f"prompts file {path!r} is not valid JSON: {e}") from e
        where = [f"entry {i}" for i in range(len(items))]
    else:
        items, where = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PromptsFileError(f"prompts file {path!r} line {number} is not valid JSON: {e}") from e
            where.append(f"line {number}")
    if not items:
        raise PromptsFileError(f"prompts file {path!r} holds no prompts")
    return [_entry(item, f"prompts file {path!r} {w}") for item, w in zip(items, where, strict=True)]


def _entry(item: object, where: str) -> PromptEntry:
    if not isinstance(item, dict) or "prompt" not in item:
        raise PromptsFileError(f"{where}: expected an object with a \"prompt\", got {str(item)[:80]}")
    unknown = sorted(set(item) - {"prompt", "max_tokens"})
    if unknown:
        raise PromptsFileError(f"{where}: unknown fields {', '.join(unknown)} (known: prompt, max_tokens)")
    prompt, max_tokens = item["prompt"], item.get("max_tokens")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise PromptsFileError(f"{where}: \"prompt\" as a list must hold token ids (integers >= 0)")
        prompt = tuple(prompt)
    elif not isinstance(prompt, str) or not prompt:
        raise PromptsFileError(f"{where}: \"prompt\" must be a non-empty string or a list of token ids")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise PromptsFileError(f"{where}: \"max_tokens\" must be a positive integer, got {max_tokens!r}")
    return PromptEntry(prompt, max_tokens)


def file_workload(entries: Sequence[PromptEntry], num_requests: int | None, output_len: LengthDistribution,
                  seed: int = 0, name: str = "prompts file") -> Workload:
    """The first `num_requests` entries (all when None) as single requests; entries without `max_tokens` draw one
    from `output_len`."""
    count = len(entries) if num_requests is None else num_requests
    _check_count(count)
    if count > len(entries):
        raise PromptsFileError(f"{name} holds {len(entries)} prompts, fewer than the {count} requests asked for")
    drawn = output_len.sample(np.random.default_rng(seed), count)
    conversations = tuple(
        Conversation("" if isinstance(e.prompt, str) else (),
                     (Turn(e.prompt, e.max_tokens if e.max_tokens is not None else int(n)),))
        for e, n in zip(entries[:count], drawn, strict=True))
    return Workload(f"{name} ({count} prompts, default output={output_len})", conversations)


def _check_count(num_requests: int) -> None:
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
