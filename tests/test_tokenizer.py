"""Tests for jaxserve/tokenizer.py: the three backends, load_tokenizer, and streaming detokenization."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Sequence

import pytest
import sentencepiece
from tokenizers import Tokenizer as HFRawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxserve.tokenizer import (
    REPLACEMENT_CHAR,
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello jax",
    "serving language models is fun",
    "héllo wörld café naïve",
    "the cat sat on the mat",
] * 3

# CJK and emoji are absent from CORPUS, so the trained tokenizers spell them as one id per byte.
STREAMED_TEXT = "hello 世界 🙂 the quick fox, naïve café"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A directory holding a tiny byte-level BPE tokenizer.json and no config files."""
    raw = HFRawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    directory = tmp_path_factory.mktemp("hf")
    raw.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A directory holding a tiny byte-fallback sentencepiece tokenizer.model."""
    directory = tmp_path_factory.mktemp("sp")
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return directory


@pytest.fixture(params=["byte", "hf", "sp"])
def any_tokenizer(request: pytest.FixtureRequest, hf_dir: pathlib.Path, sp_dir: pathlib.Path) -> Tokenizer:
    return {
        "byte": lambda: load_tokenizer("byte"),
        "hf": lambda: load_tokenizer(str(hf_dir)),
        "sp": lambda: load_tokenizer(str(sp_dir)),
    }[request.param]()


def stream(tokenizer: Tokenizer, ids: list[int], chunk: int, context_ids: Sequence[int] = ()) -> list[str]:
    """Deltas from feeding `ids` `chunk` at a time, then the flush."""
    detok = IncrementalDetokenizer(tokenizer, context_ids)
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("text", ["", "hello, world", "héllo 世界 🙂"])
def test_byte_tokenizer_round_trips_utf8(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_special_ids_are_fixed_and_carry_no_text() -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (258, 256, (257,))
    ids = tok.encode("hi", add_bos=True)
    assert ids == [256, ord("h"), ord("i")]
    assert tok.decode([*ids, 257]) == "hi"


def test_byte_tokenizer_decodes_invalid_utf8_with_replacement() -> None:
    assert ByteTokenizer().decode([0xFF, ord("a")]) == REPLACEMENT_CHAR + "a"


def test_byte_tokenizer_gives_no_text_for_padding_ids_and_rejects_negative_ones() -> None:
    assert ByteTokenizer().decode([104, 258, 271, 105]) == "hi"
    with pytest.raises(ValueError, match="-1"):
        ByteTokenizer().decode([-1])


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_deltas_join_to_full_decode_without_split_characters(
    any_tokenizer: Tokenizer, chunk: int
) -> None:
    ids = any_tokenizer.encode(STREAMED_TEXT)
    assert any_tokenizer.decode(ids) == STREAMED_TEXT
    deltas = stream(any_tokenizer, ids, chunk)
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "".join(deltas) == STREAMED_TEXT


def test_incremental_holds_back_partial_character_until_it_completes() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    first, second, third = "世".encode()
    assert detok.add([ord("a")]) == "a"
    assert detok.add([first]) == ""
    assert detok.add([second]) == ""
    assert detok.add([third]) == "世"
    assert detok.flush() == ""


def test_flush_emits_incomplete_trailing_bytes_as_decode_does() -> None:
    tok = ByteTokenizer()
    ids = [ord("a"), *"世".encode()[:2]]
    deltas = stream(tok, ids, 1)
    assert deltas[-1] == REPLACEMENT_CHAR
    assert "".join(deltas) == tok.decode(ids)


def test_incremental_with_context_keeps_leading_space_of_first_generated_word(sp_dir: pathlib.Path) -> None:
    tok = load_tokenizer(str(sp_dir))
    context = tok.encode("hello world,")
    generated = tok.encode("hello world, the cat 🙂")[len(context) :]
    full = tok.decode(context + generated)
    assert "".join(stream(tok, generated, 1, context)) == full[len(tok.decode(context)) :]
    assert tok.decode(generated).startswith("the")
    assert "".join(stream(tok, generated, 1, context)).startswith(" the")


def test_load_tokenizer_accepts_files_and_directories(hf_dir: pathlib.Path, sp_dir: pathlib.Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(str(hf_dir)), HFTokenizer)
    assert isinstance(load_tokenizer(str(hf_dir / "tokenizer.json")), HFTokenizer)
    assert isinstance(load_tokenizer(str(sp_dir)), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(str(sp_dir / "tokenizer.model")), SentencePieceTokenizer)


@pytest.mark.parametrize("name", ["missing/tokenizer.json", "empty_dir", "notes.txt"])
def test_load_tokenizer_rejects_unknown_path_naming_it(tmp_path: pathlib.Path, name: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    path = str(tmp_path / name)
    with pytest.raises(ValueError, match="tokenizer.json") as error:
        load_tokenizer(path)
    assert path in str(error.value)


def test_hf_tokenizer_without_configs_has_no_special_ids(hf_dir: pathlib.Path) -> None:
    tok = load_tokenizer(str(hf_dir))
    assert (tok.bos_id, tok.eos_ids) == (None, ())
    assert tok.encode("hello", add_bos=True) == tok.encode("hello")
    assert tok.vocab_size == 300


def test_hf_tokenizer_reads_special_ids_from_sibling_configs(
    hf_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>", "__type": "AddedToken"}})
    )
    generation_config = {"eos_token_id": [1, 42], "bos_token_id": None}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_ids) == (0, (1, 42))
    ids = tok.encode("hello", add_bos=True)
    assert ids[0] == 0
    assert tok.decode([*ids, 1]) == "hello"


def test_hf_tokenizer_rejects_eos_token_missing_from_vocabulary(
    hf_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"config.json: eos_token"):
        load_tokenizer(str(tmp_path))


def test_sentencepiece_special_ids_come_from_the_model(sp_dir: pathlib.Path) -> None:
    tok = load_tokenizer(str(sp_dir / "tokenizer.model"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (300, 1, (2,))
    ids = tok.encode("the cat", add_bos=True)
    assert ids[0] == 1
    assert tok.decode([*ids, 2]) == "the cat"
