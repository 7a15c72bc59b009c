"""Hugging Face safetensors directories -> canonical parameter trees -> orbax checkpoints."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from safetensors import safe_open

from checkpoints.hf import CheckpointError, canonical_from_hf, model_config_from_hf
from jaxserve.config import ModelConfig


def read_hf_config(hf_dir: str, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from `hf_dir/config.json`."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{hf_dir!r} has no config.json")
    with open(path) as f:
        return model_config_from_hf(json.load(f), name=os.path.basename(os.path.normpath(hf_dir)), dtype=dtype)


def load_hf_canonical(hf_dir: str, cfg: ModelConfig) -> dict[str, Any]:
    """Reads every `*.safetensors` shard of `hf_dir` into the canonical tree (numpy, float32)."""
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{hf_dir!r} has no .safetensors files")
    where: dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                where[name] = path
    handles = {path: safe_open(path, framework="numpy") for path in files}
    return canonical_from_hf(lambda n: handles[where[n]].get_tensor(n), set(where), cfg)
