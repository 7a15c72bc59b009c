"""jaxserve-serve: serve a model over gRPC (jaxserve.v1, JetStream-compatible, health, reflection) until SIGTERM.

    jaxserve-serve                                    # the shipped default model, configs/default.toml
    jaxserve-serve --config configs/llama3-8b.toml --checkpoint /data/llama3-8b --port 50051 --metrics_port 9090

Flags left unset keep the config's values; `--set section.field=value` overrides any field. SIGTERM or SIGINT drains:
health NOT_SERVING, new requests UNAVAILABLE, in-flight requests finish within server.grace_period_s, exit 0. If the
engine loop dies the server stops with exit status 1. Prints one line once it serves:
`jaxserve-serve: serving <model> on <host>:<port>`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from absl import app, flags, logging

from checkpoints.hf import CheckpointError
from checkpoints.orbax_io import load_serving_params
from jaxserve.allocator import reexec_under_tcmalloc
from jaxserve.cli.flags import define_config_flags
from jaxserve.config import Config, ConfigError, load_config
from jaxserve.engine import Engine
from jaxserve.metrics import Metrics
from jaxserve.parallel.mesh import make_mesh
from jaxserve.runner import Runner
from jaxserve.sequence import SamplingOptions
from jaxserve.server.app import Server
from jaxserve.tokenizer import load_tokenizer

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "default.toml")
AUTH_TOKEN_ENV = "JAXSERVE_AUTH_TOKEN"

define_config_flags()
flags.FLAGS.set_default("config", DEFAULT_CONFIG)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory (checkpoint.path); empty string: "
                                  "random weights.")
_HOST = flags.DEFINE_string("host", None, "Address to bind (server.host; 127.0.0.1 unless the config says otherwise).")
_PORT = flags.DEFINE_integer("port", None, "gRPC port (server.port); 0 picks a free one.")
_METRICS_PORT = flags.DEFINE_integer("metrics_port", None, "Prometheus port (server.metrics_port); 0 disables it.")
_MAX_WAITING = flags.DEFINE_integer("max_waiting", None, "Queued requests before RESOURCE_EXHAUSTED "
                                    "(engine.max_waiting).")
_MAX_PROMPT_TOKENS = flags.DEFINE_integer("max_prompt_tokens", None, "Longest prompt (server.max_prompt_tokens).")
_MAX_TOKENS_CAP = flags.DEFINE_integer("max_tokens_cap", None, "Largest max_tokens (server.max_tokens_cap).")
_MAX_MESSAGE_BYTES = flags.DEFINE_integer("max_message_bytes", None, "Largest request message "
                                          "(server.max_message_bytes).")
_GRACE_PERIOD_S = flags.DEFINE_float("grace_period_s", None, "Seconds in-flight requests get to finish on SIGTERM "
                                     "(server.grace_period_s).")
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate chain; with --tls_key enables TLS.")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key of --tls_cert.")
_AUTH_TOKEN_FILE = flags.DEFINE_string("auth_token_file", None, "File holding the bearer token clients must send "
                                       f"(also ${AUTH_TOKEN_ENV}, or server.auth_token).")
_JETSTREAM_TEMPERATURE = flags.DEFINE_float("jetstream_temperature", 0.0, "Sampling temperature of JetStream "
                                            "Decode requests (which carry no sampling knobs); 0 is greedy.")
_JETSTREAM_TOP_K = flags.DEFINE_integer("jetstream_top_k", 0, "top_k of JetStream Decode requests (0: off).")
_JETSTREAM_TOP_P = flags.DEFINE_float("jetstream_top_p", 1.0, "top_p of JetStream Decode requests.")

# flag -> the config field it overrides.
_FIELD_FLAGS = (
    (_CHECKPOINT, "checkpoint.path"), (_HOST, "server.host"), (_PORT, "server.port"),
    (_METRICS_PORT, "server.metrics_port"), (_MAX_WAITING, "engine.max_waiting"),
    (_MAX_PROMPT_TOKENS, "server.max_prompt_tokens"), (_MAX_TOKENS_CAP, "server.max_tokens_cap"),
    (_MAX_MESSAGE_BYTES, "server.max_message_bytes"), (_GRACE_PERIOD_S, "server.grace_period_s"),
    (_TLS_CERT, "server.tls_cert"), (_TLS_KEY, "server.tls_key"),
)


def _auth_token() -> str | None:
    if _AUTH_TOKEN_FILE.value:
        with open(_AUTH_TOKEN_FILE.value, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get(AUTH_TOKEN_ENV) or None


def load_serving_config() -> Config:
    """The config file with every `--set`, then the dedicated flags that were given, applied on top."""
    overrides = [f"{field}={json.dumps(flag.value)}" for flag, field in _FIELD_FLAGS if flag.value is not None]
    token = _auth_token()
    if token:
        overrides.append(f"server.auth_token={json.dumps(token)}")
    try:
        return load_config(flags.FLAGS.config, [*flags.FLAGS.set, *overrides])
    except ConfigError as e:
        raise app.UsageError(f"bad config: {e}") from e


def _exit_during_startup() -> None:
    """Stops a server still warming up: nothing is in flight yet (health says NOT_SERVING), and the compiler thread
    cannot be interrupted, so a clean exit is an immediate one."""
    logging.info("stop requested during start-up: exiting")
    os._exit(0)


async def _serve(server: Server) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _exit_during_startup)
    print(f"jaxserve-serve: starting {server.config.model.name}", flush=True)
    port = await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    print(f"jaxserve-serve: serving {server.config.model.name} on {server.config.server.host}:{port}", flush=True)
    return await server.wait()


def main(argv: list[str]) -> None:
    """Loads the model, serves it, and exits with the server's status."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = load_serving_config()
    try:
        jetstream_options = SamplingOptions(temperature=_JETSTREAM_TEMPERATURE.value, top_k=_JETSTREAM_TOP_K.value,
                                            top_p=_JETSTREAM_TOP_P.value)
    except ValueError as e:  # the message starts with the field: temperature, top_k or top_p
        raise app.UsageError(f"--jetstream_{e}") from e
    try:
        mesh = make_mesh(config.mesh)
        runner = Runner(config, params=load_serving_params(config, mesh), mesh=mesh)
        tokenizer = load_tokenizer(config.tokenizer.path)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"jaxserve-serve: error: {e}")
    metrics = Metrics()
    if config.server.metrics_port:
        metrics.serve(config.server.metrics_port, config.server.host)
    engine = Engine(config, runner, tokenizer, metrics)
    code = asyncio.run(_serve(Server(config, engine, tokenizer, jetstream_options)))
    if code:
        sys.exit(f"jaxserve-serve: the engine loop died ({engine.fatal_error!r}); exiting with status {code}")


def run() -> None:
    """Console-script entry point (under tcmalloc when installed: see jaxserve.allocator)."""
    reexec_under_tcmalloc()
    app.run(main)


if __name__ == "__main__":
    run()
