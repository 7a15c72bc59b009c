"""Orbax checkpoints of the canonical parameter tree: save one, and restore it straight into serving shardings.

A checkpoint directory holds orbax's files plus `jaxserve_model.json`, the ModelConfig it was written with, so a
checkpoint carries its own shapes. Loading checks the stored tensor shapes and model fields against the config
before reading any weight, and every failure surfaces as a `CheckpointError` naming the directory and the tensor.
Must not touch: Hugging Face formats (checkpoints/convert.py), the serving layout itself (jaxserve/parallel/layout.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from checkpoints.hf import CheckpointError
from jaxserve.config import Config, ConfigError, ModelConfig
from jaxserve.parallel import layout
from models import llama

Params = dict[str, Any]

MODEL_JSON = "jaxserve_model.json"

# ModelConfig fields that change the function the weights compute; a config that disagrees with the checkpoint on
# one of these would serve a different model. Names, dtypes (restore casts), position limits and special tokens may
# differ.
_ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
    "rope_high_freq_factor", "rope_original_max_position", "attention_bias", "tie_embeddings", "sliding_window",
)


def _tensor_paths(tree: Params) -> dict[str, Any]:
    """Flattens a nested dict to {"layers/attn/q_proj/kernel": leaf}."""
    out: dict[str, Any] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(k, "key", k)) for k in key_path)] = leaf
    return out


def _check_tensors(expected: Params, found: Params, where: str) -> None:
    """Raises CheckpointError on the first missing, unexpected or differently shaped tensor of `found`."""
    want, have = _tensor_paths(expected), _tensor_paths(found)
    for name, spec in want.items():
        if name not in have:
            raise CheckpointError(f"{where}: tensor {name} is missing (expected shape {tuple(spec.shape)})")
        if tuple(have[name].shape) != tuple(spec.shape):
            raise CheckpointError(
                f"{where}: tensor {name}: expected shape {tuple(spec.shape)}, found {tuple(have[name].shape)}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensors {', '.join(extra)} (the config does not use them)")


def save_canonical(path: str, canonical: Params, model_config: ModelConfig, overwrite: bool = False) -> None:
    """Writes a canonical tree (numpy or sharded jax arrays, layers stacked [L, ...]) and its ModelConfig to `path`.

    Blocks until the checkpoint is complete. Refuses to replace an existing directory unless `overwrite`.
    """
    path = os.path.abspath(path)
    _check_tensors(llama.abstract_params(model_config), canonical, f"saving {path!r}")
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path!r} already exists (overwrite=True / --overwrite replaces it)")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, canonical, force=overwrite)
    checkpointer.wait_until_finished()
    checkpointer.close()
    # Written after orbax has committed the directory: an interrupted save leaves no model file, which loading
    # reports, rather than a model file describing weights that never landed.
    with open(os.path.join(path, MODEL_JSON), "w") as f:
        json.dump(dataclasses.asdict(model_config), f, indent=2)
        f.write("\n")


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with (`path/jaxserve_model.json`)."""
    file = os.path.join(path, MODEL_JSON)
    try:
        with open(file) as f:
            fields = json.load(f)
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
        return ModelConfig(**fields)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path!r}: {MODEL_JSON} is missing; was it written by save_canonical?") from e
    except (OSError, ValueError, TypeError, ConfigError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {MODEL_JSON} is unreadable ({type(e).__name__}: {e})") from e


def _stored_tensors(path: str) -> Params:
    """The tree of orbax ArrayMetadata (shape, dtype) stored at `path`, read without touching the weights."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a directory")
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(path)).tree
    except Exception as e:  # orbax and tensorstore raise many types for one cause: the files are damaged
        raise CheckpointError(f"checkpoint {path!r}: its metadata is unreadable ({_describe(e)})") from e
    finally:
        handler.close()
    if not isinstance(tree, dict):
        raise CheckpointError(f"checkpoint {path!r}: expected a tree of named tensors, found {type(tree).__name__}")
    return tree


def _describe(e: BaseException) -> str:
    """Type and first line of the innermost exception, naming the tensor when tensorstore did."""
    cause = _root_cause(e)
    lines = str(cause).strip().splitlines()
    tensor = _failed_tensor(cause)
    return f"{f'tensor {tensor}: ' if tensor else ''}{type(cause).__name__}: {lines[0][:500] if lines else ''}"


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain: orbax wraps tensorstore's specific error in a generic one."""
    while (inner := e.__cause__ or e.__context__) is not None:
        e = inner
    return e


def _failed_tensor(e: BaseException) -> str:
    """The tensor a tensorstore error mentions (orbax names arrays "layers.attn.q_proj.kernel"), else ''."""
    m = re.search(r'"([\w.]+)/(?:\.zarray|zarr\.json|[\d.]+)"', str(e))
    return m.group(1).replace(".", "/") if m else ""


def _check_model_fields(expected: ModelConfig, saved: ModelConfig, path: str) -> None:
    diffs = [f"model.{name}: config has {getattr(expected, name)!r}, checkpoint has {getattr(saved, name)!r}"
             for name in _ARCHITECTURE_FIELDS if getattr(expected, name) != getattr(saved, name)]
    if diffs:
        raise CheckpointError(f"checkpoint {path!r} was saved for a different model: {'; '.join(diffs)}")


def restore_canonical(path: str, config: Config, mesh: Mesh) -> Params:
    """Restores the canonical tree at `path` directly into its canonical shardings on `mesh`.

    Each device reads only its own slices; shapes and model fields are checked against `config` first.
    """
    path = os.path.abspath(path)
    stored = _stored_tensors(path)
    expected = llama.abstract_params(config.model)
    _check_tensors(expected, stored, f"checkpoint {path!r}")
    _check_model_fields(config.model, read_model_config(path), path)
    shardings = layout.shardings(mesh, layout.canonical_specs(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), expected, shardings)
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(path, target)
    except Exception as e:  # tensorstore reports damaged data as ValueError, OSError, ... with a status prefix
        raise CheckpointError(f"checkpoint {path!r}: reading the weights failed ({_describe(e)})") from e
    finally:
        checkpointer.close()


def load_serving_params(config: Config, mesh: Mesh) -> Params:
    """Serving params on `mesh`: restored from `config.checkpoint.path`, or seeded random weights when it is empty."""
    if not config.checkpoint.path:
        logging.info("no checkpoint.path: random weights (seed %d)", config.checkpoint.seed)
        return layout.random_serving_params(config, mesh)
    logging.info("restoring %s onto mesh %s", config.checkpoint.path, dict(mesh.shape))
    canonical = restore_canonical(config.checkpoint.path, config, mesh)
    return layout.place_serving(canonical, config, mesh)

