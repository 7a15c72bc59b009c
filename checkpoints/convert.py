"""Hugging Face safetensors directories -> canonical parameter trees -> orbax checkpoints (plus a TOML config).

Tensors are read one at a time from memory-mapped shards, so conversion needs about one copy of the model in the
target dtype. The safetensors files are parsed here rather than through `safe_open(framework="numpy")`, which
cannot return bfloat16, the dtype most checkpoints are published in. No device work: orbax saves host arrays.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np

from checkpoints.hf import CheckpointError, canonical_from_hf, model_config_from_hf
from checkpoints.orbax_io import save_canonical
from jaxserve.config import ConfigError, ModelConfig, RunnerConfig, load_config
from models import llama

Params = dict[str, Any]

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One .safetensors shard: its header, and tensors memory-mapped on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header length {header_len} exceeds the file size {size}")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{path!r} is not a readable safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self.entries: dict[str, dict[str, Any]] = header
        for name, entry in header.items():
            end = entry.get("data_offsets", [0, 0])[1]
            if entry.get("dtype") not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path!r}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            if self._data_start + end > size:
                raise CheckpointError(f"{path!r} is truncated: tensor {name!r} ends past the end of the file")

    def keys(self) -> list[str]:
        """Names of the tensors in this shard."""
        return list(self.entries)

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor."""
        entry = self.entries[name]
        begin, _ = entry["data_offsets"]
        shape = tuple(entry["shape"])
        return np.memmap(self.path, dtype=_SAFETENSORS_DTYPES[entry["dtype"]], mode="r",
                         offset=self._data_start + begin, shape=shape)


def read_hf_config(hf_dir: str, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from `hf_dir/config.json`."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{hf_dir!r} has no config.json")
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path!r} is not valid JSON: {e}") from e
    try:
        return model_config_from_hf(hf, name=os.path.basename(os.path.normpath(hf_dir)), dtype=dtype)
    except KeyError as e:
        raise CheckpointError(f"{path!r} lacks the field {e.args[0]!r}") from e
    except ConfigError as e:
        raise CheckpointError(f"{path!r} describes an invalid model: {e}") from e


def _shards(hf_dir: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the shard holding it, from the index file when there is one."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.exists(os.path.join(hf_dir, name))]
        if missing:
            raise CheckpointError(f"{index!r} lists shards that do not exist: {', '.join(missing)}")
        opened = {name: SafetensorsFile(os.path.join(hf_dir, name)) for name in files}
        where = {}
        for tensor, name in weight_map.items():
            if tensor not in opened[name].entries:
                raise CheckpointError(f"{index!r} places tensor {tensor!r} in {name!r}, which does not hold it")
            where[tensor] = opened[name]
        return where
    paths = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not paths:
        raise CheckpointError(f"{hf_dir!r} has no .safetensors files")
    return {tensor: shard for shard in map(SafetensorsFile, paths) for tensor in shard.keys()}


def num_hf_tensors(cfg: ModelConfig) -> int:
    """How many Hugging Face tensors make up `cfg`'s canonical tree (one per layer per stacked leaf)."""
    abstract = llama.abstract_params(cfg)
    return (len(jax.tree.leaves(abstract["layers"])) * cfg.num_layers
            + len(jax.tree.leaves({k: v for k, v in abstract.items() if k != "layers"})))


def load_hf_canonical(hf_dir: str, cfg: ModelConfig, on_tensor: Callable[[], None] = lambda: None) -> Params:
    """Reads the safetensors shards of `hf_dir`, tensor by tensor, into the canonical tree in `cfg.param_dtype`."""
    if cfg.param_dtype not in NUMPY_DTYPES:
        raise CheckpointError(f"param_dtype {cfg.param_dtype!r} is not one of {', '.join(NUMPY_DTYPES)}")
    where = _shards(hf_dir)
    return canonical_from_hf(lambda n: where[n].get(n), set(where), cfg, on_tensor, NUMPY_DTYPES[cfg.param_dtype])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config_toml(path: str, cfg: ModelConfig, checkpoint_dir: str, tokenizer_path: str | None) -> None:
    """Writes a configs/ TOML serving `checkpoint_dir`; paths are stored relative to the file, as load_config reads
    them. Checks that the file loads."""
    base = os.path.dirname(os.path.abspath(path))
    lines = ["# Written by jaxserve-convert.", "[model]"]
    lines += [f"{f.name} = {_toml_value(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)]
    max_seq_len = RunnerConfig().max_seq_len
    if cfg.max_position < max_seq_len:
        lines += ["", "[runner]", f"max_seq_len = {cfg.max_position}"]
    lines += ["", "[checkpoint]", f"path = {_toml_value(os.path.relpath(os.path.abspath(checkpoint_dir), base))}"]
    if tokenizer_path:
        lines += ["", "[tokenizer]", f"path = {_toml_value(os.path.relpath(os.path.abspath(tokenizer_path), base))}"]
    os.makedirs(base, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        load_config(path)
    except ConfigError as e:
        raise CheckpointError(f"the config written to {path!r} does not load: {e}") from e


@dataclasses.dataclass(frozen=True)
class ConvertSummary:
    """What one conversion wrote."""

    out: str
    num_tensors: int
    num_params: int
    num_bytes: int
    seconds: float
    copied: tuple[str, ...]
    config_out: str | None

    def line(self) -> str:
        """One line for humans."""
        extra = f", config {self.config_out}" if self.config_out else ""
        return (f"converted {self.num_tensors} tensors, {self.num_params:,} params, {self.num_bytes / 2**20:.1f} MiB "
                f"in {self.seconds:.1f} s -> {self.out} (+{len(self.copied)} tokenizer files{extra})")


def convert(hf_dir: str, out: str, dtype: str = "float32", config_out: str | None = None, overwrite: bool = False,
            on_tensor: Callable[[], None] = lambda: None) -> ConvertSummary:
    """Converts a Hugging Face Llama/Mistral/Qwen2 directory into an orbax checkpoint at `out`.

    Tokenizer files found in `hf_dir` are copied into `out`; with `config_out`, a TOML config serving `out` is
    written there. `on_tensor` is called once per tensor read (progress bars).
    """
    start = time.perf_counter()
    cfg = read_hf_config(hf_dir, dtype)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out!r} already exists (overwrite=True / --overwrite replaces it)")
    canonical = load_hf_canonical(hf_dir, cfg, on_tensor)
    save_canonical(out, canonical, cfg, overwrite=overwrite)
    leaves = jax.tree.leaves(canonical)
    num_params = sum(a.size for a in leaves)
    num_bytes = sum(a.nbytes for a in leaves)
    del canonical, leaves
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(hf_dir, name)
        if os.path.exists(src):
            copied.append(shutil.copy(src, os.path.join(out, name)))
    if config_out:
        tokenizer = next((os.path.join(out, n) for n in ("tokenizer.json", "tokenizer.model")
                          if os.path.join(out, n) in copied), None)
        write_config_toml(config_out, cfg, out, tokenizer)
    return ConvertSummary(out=os.path.abspath(out), num_tensors=num_hf_tensors(cfg), num_params=num_params,
                          num_bytes=num_bytes, seconds=time.perf_counter() - start, copied=tuple(copied),
                          config_out=config_out)
