"""Text <-> token ids: one `Tokenizer` interface, its three backends, and streaming detokenization.

Owns only the mapping between strings and ids (and which ids are BOS / EOS); it knows nothing of models, JAX,
requests or the server. Backends: `ByteTokenizer` (no file; the shipped default model is trained with it),
`HFTokenizer` (a Hugging Face tokenizer.json) and `SentencePieceTokenizer` (a sentencepiece .model);
`load_tokenizer` picks one from a `TokenizerConfig.path`. `IncrementalDetokenizer` turns ids arriving a few at
a time into text deltas that never split a UTF-8 character.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

import sentencepiece
import tokenizers
from absl import logging

# What decoders emit for bytes that are not (yet) a complete UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer.

    Incremental detokenization needs nothing beyond `decode`: `IncrementalDetokenizer` decodes short windows
    of ids, which (unlike concatenating per-token bytes) keeps every decoder's context-dependent rules, such
    as sentencepiece dropping the leading space of the first word.
    """

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; every id is in [0, vocab_size)."""
        ...

    @property
    def bos_id(self) -> int | None:
        """Id prepended by `encode(..., add_bos=True)`, or None when the tokenizer has no BOS token."""
        ...

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation; empty when none is known."""
        ...

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids for `text`, with BOS first when `add_bos` and the tokenizer has one; no other special ids."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`, skipping special ids; incomplete or invalid UTF-8 becomes U+FFFD."""
        ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; 256 is BOS, 257 is EOS; vocab_size is 258.

    These ids are fixed: the shipped default checkpoint was trained with them.
    """

    BOS_ID = 256
    EOS_ID = 257
    VOCAB_SIZE = 258

    def __init__(self) -> None:
        self.vocab_size = self.VOCAB_SIZE
        self.bos_id: int | None = self.BOS_ID
        self.eos_ids: tuple[int, ...] = (self.EOS_ID,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """UTF-8 bytes of `text` as ids, BOS first when asked."""
        ids = list(text.encode("utf-8"))
        return [self.BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; BOS, EOS and the padding rows a model's vocabulary may add past them carry no text."""
        for i in ids:
            if i < 0:
                raise ValueError(f"token id {i} is negative")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, with BOS/EOS taken from the config files next to it."""

    # Read in this order: the first BOS found wins; EOS ids from all files are merged (a model may stop on
    # several, e.g. Llama 3's end-of-text and end-of-turn).
    SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "config.json", "generation_config.json")

    def __init__(self, path: str) -> None:
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for unreadable or malformed files.
            raise ValueError(f"{path}: not a valid Hugging Face tokenizer.json: {e}") from e
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_ids = self._read_special_ids(os.path.dirname(os.path.abspath(path)))
        logging.info(
            "Loaded tokenizer %s: vocab_size=%d bos=%s eos=%s",
            path,
            self.vocab_size,
            self.bos_id,
            self.eos_ids,
        )

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids for `text`; BOS is added here rather than by the post-processor so `add_bos` means the same
        for every backend."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids` without special tokens."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def _read_special_ids(self, directory: str) -> tuple[int | None, tuple[int, ...]]:
        bos_id: int | None = None
        eos_ids: list[int] = []
        for name in self.SPECIAL_TOKEN_FILES:
            file = os.path.join(directory, name)
            if not os.path.isfile(file):
                continue
            with open(file, encoding="utf-8") as f:
                fields = json.load(f)
            for key in ("bos_token", "bos_token_id"):
                found = self._resolve(fields.get(key), f"{file}: {key}")
                if bos_id is None and found:
                    bos_id = found[0]
            for key in ("eos_token", "eos_token_id"):
                found = self._resolve(fields.get(key), f"{file}: {key}")
                eos_ids.extend(i for i in found if i not in eos_ids)
        return bos_id, tuple(eos_ids)

    def _resolve(self, value: object, field: str) -> list[int]:
        """Ids a config value names: null, an id, a token string, an AddedToken dict, or a list of these."""
        if value is None:
            return []
        if isinstance(value, list):
            return [i for v in value for i in self._resolve(v, field)]
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            value = value["content"]
        if isinstance(value, str):
            token_id = self._tokenizer.token_to_id(value)
            if token_id is None:
                raise ValueError(f"{field}: token {value!r} is not in the vocabulary")
            return [token_id]
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{field}: id {value} is outside the vocabulary [0, {self.vocab_size})")
            return [value]
        raise ValueError(f"{field}: expected a token, an id or a list of them, got {value!r}")


class SentencePieceTokenizer:
    """A sentencepiece `.model` (Llama 2, Mistral); BOS/EOS are the model's own control pieces."""

    def __init__(self, path: str) -> None:
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid sentencepiece model: {e}") from e
        self.vocab_size = self._processor.get_piece_size()
        # sentencepiece reports a disabled special piece as -1.
        bos = self._processor.bos_id()
        eos = self._processor.eos_id()
        self.bos_id: int | None = bos if bos >= 0 else None
        self.eos_ids: tuple[int, ...] = (eos,) if eos >= 0 else ()
        logging.info(
            "Loaded tokenizer %s: vocab_size=%d bos=%s eos=%s",
            path,
            self.vocab_size,
            self.bos_id,
            self.eos_ids,
        )

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids for `text`, BOS first when asked and the model has one."""
        ids: list[int] = self._processor.encode(text, out_type=int)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`; control pieces (BOS/EOS) decode to nothing."""
        return self._processor.decode(list(ids))


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer a `TokenizerConfig.path` names, so callers never branch on the backend.

    `byte` gives `ByteTokenizer`; a tokenizer.json (or a directory holding one) gives `HFTokenizer`; a
    `.model` file (or a directory holding tokenizer.model) gives `SentencePieceTokenizer`. Anything else
    raises ValueError naming the path.
    """
    if path == "byte":
        return ByteTokenizer()
    if os.path.isdir(path):
        for name, backend in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if os.path.isfile(os.path.join(path, name)):
                return backend(os.path.join(path, name))
    elif os.path.isfile(path) and path.endswith(".json"):
        return HFTokenizer(path)
    elif os.path.isfile(path) and path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise ValueError(
        f"cannot load a tokenizer from {path!r}: expected 'byte', a tokenizer.json file, a sentencepiece "
        ".model file, or a directory holding tokenizer.json or tokenizer.model"
    )


class IncrementalDetokenizer:
    """Streams one sequence's text as its ids arrive, never splitting a UTF-8 character.

    Each call decodes a short window — the ids behind the last emitted delta plus the new ones — and emits the
    text beyond the window's already-emitted prefix (the vLLM approach). Decoding with that prefix keeps
    decoders' context rules (a word's leading space) right; text ending in U+FFFD is held back, since the next
    id may complete the character. Joined, the deltas equal `tokenizer.decode(ids)`, or with `context_ids` the
    text that `ids` add after the context.
    """

    # Prompt ids kept as context: enough for decoders to see the word boundary before the first generated id.
    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        # The window: ids whose text was already emitted, then ids not yet emitted from `_read_offset` on.
        self._ids = list(context_ids[-self.CONTEXT_TOKENS :])
        self._read_offset = len(self._ids)

    def add(self, new_ids: Sequence[int]) -> str:
        """Takes the next ids of the sequence; returns the text they complete (possibly empty)."""
        self._ids.extend(new_ids)
        prefix_text = self._tokenizer.decode(self._ids[: self._read_offset])
        text = self._tokenizer.decode(self._ids)
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(text, prefix_text)

    def flush(self) -> str:
        """Text still held back, incomplete characters as U+FFFD; call once the sequence has ended."""
        prefix_text = self._tokenizer.decode(self._ids[: self._read_offset])
        return self._emit(self._tokenizer.decode(self._ids), prefix_text)

    def _emit(self, text: str, prefix_text: str) -> str:
        # The ids just emitted become the next window's prefix; older ones are no longer needed.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        return text[len(prefix_text) :]
