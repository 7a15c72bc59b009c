"""A jaxserve gRPC server started in-process on a free 127.0.0.1 port over a shared Runner, stopped on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from jaxserve.config import load_config
from jaxserve.engine import Engine
from jaxserve.runner import Runner
from jaxserve.server.app import BackgroundServer, Server
from jaxserve.tokenizer import ByteTokenizer

TIMEOUT = 300


@contextlib.contextmanager
def serving(runner: Runner, config_path: str, overrides: Sequence[str]) -> Iterator[BackgroundServer]:
    """A started server over `runner`; `overrides` may change the engine and server sections only."""
    config = load_config(config_path, ["server.port=0", *overrides])
    tokenizer = ByteTokenizer()
    server = BackgroundServer(Server(config, Engine(config, runner, tokenizer), tokenizer))
    server.start(timeout=TIMEOUT)
    try:
        yield server
    finally:
        server.stop(timeout=TIMEOUT)
