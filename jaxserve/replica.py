"""Builds one serving replica from a Config: mesh, weights (orbax or seeded random), runner, tokenizer.

The single place entry points (serve, generate, bench) turn a config into live objects, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging

from checkpoints.orbax_io import load_serving_params
from jaxserve.config import Config
from jaxserve.parallel.mesh import make_mesh
from jaxserve.runner import Runner
from jaxserve.tokenizer import Tokenizer, load_tokenizer

# The shipped default: a small model trained on the Python standard library, byte-level tokenizer.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.toml")


@dataclasses.dataclass
class Replica:
    """The live parts of one model replica."""

    config: Config
    runner: Runner
    tokenizer: Tokenizer


def build_replica(config: Config) -> Replica:
    """Loads weights straight into their shardings, builds the runner (warming every bucket if configured)."""
    tokenizer = load_tokenizer(config.tokenizer.path)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer {config.tokenizer.path!r} has {tokenizer.vocab_size} tokens, more than "
                         f"model.vocab_size={config.model.vocab_size}")
    mesh = make_mesh(config.mesh)
    params = load_serving_params(config, mesh)
    runner = Runner(config, params=params, mesh=mesh)
    if config.runner.warmup:
        logging.info("warming up %d page buckets", len(runner.page_buckets))
        runner.warmup()
    return Replica(config, runner, tokenizer)
