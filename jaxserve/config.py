"""Typed, frozen configuration: defaults live here, files in configs/ and command-line overrides only change them.

A config file is TOML with one table per section (`[model]`, `[mesh]`, ...). Every field can be overridden with
`section.field=value` strings (the `--set` flag of every CLI); values are parsed as TOML, so `4`, `1e-5`, `true`,
`"bfloat16"` and `[1, 2, 4]` mean what they look like, and a bare word is taken as a string. Unknown sections,
unknown fields, wrong types and out-of-range values raise `ConfigError` naming the field. No JAX here.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config file or override names an unknown field or gives it a bad value."""


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-family decoder (Llama 2/3, Mistral, Qwen2)."""

    name: str = "tiny"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 160
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # "none", "linear" or "llama3" (Llama 3.1+ frequency-dependent scaling).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position: int = 2048
    attention_bias: bool = False
    tie_embeddings: bool = False
    # 0 means full attention; Mistral v0.1 uses 4096.
    sliding_window: int = 0
    bos_token_id: int = -1
    eos_token_ids: tuple[int, ...] = ()
    # Ids at or past this are padding rows of the embedding (vocab padded for sharding) and are never sampled;
    # 0 samples the whole vocabulary.
    sampled_vocab_size: int = 0
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position", "rope_original_max_position"):
            _require(getattr(self, f) > 0, f"model.{f}", f"must be > 0, got {getattr(self, f)}")
        _require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
                 f"must divide model.num_heads={self.num_heads}, got {self.num_kv_heads}")
        _require(self.rms_norm_eps > 0, "model.rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        _require(self.rope_theta > 0, "model.rope_theta", f"must be > 0, got {self.rope_theta}")
        _require(self.rope_scaling in ("none", "linear", "llama3"), "model.rope_scaling",
                 f"must be one of none, linear, llama3; got {self.rope_scaling!r}")
        _require(self.rope_scaling_factor >= 1.0, "model.rope_scaling_factor",
                 f"must be >= 1, got {self.rope_scaling_factor}")
        _require(self.sliding_window >= 0, "model.sliding_window", f"must be >= 0, got {self.sliding_window}")
        _require(self.bos_token_id < self.vocab_size, "model.bos_token_id",
                 f"must be < vocab_size={self.vocab_size}, got {self.bos_token_id}")
        _require(0 <= self.sampled_vocab_size <= self.vocab_size, "model.sampled_vocab_size",
                 f"must be in [0, vocab_size={self.vocab_size}], got {self.sampled_vocab_size}")
        for t in self.eos_token_ids:
            _require(0 <= t < self.vocab_size, "model.eos_token_ids", f"{t} is outside [0, {self.vocab_size})")
        _require(self.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}")
        _require(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def num_queries_per_kv(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over the axes (data, pipeline, tensor), and pipeline microbatching."""

    data: int = 1
    pipeline: int = 1
    tensor: int = 1
    # Microbatches in flight through the pipeline per step; 0 picks one per stage.
    microbatches: int = 0

    def __post_init__(self) -> None:
        for f in ("data", "pipeline", "tensor"):
            _require(getattr(self, f) >= 1, f"mesh.{f}", f"must be >= 1, got {getattr(self, f)}")
        _require(self.microbatches >= 0, "mesh.microbatches", f"must be >= 0, got {self.microbatches}")

    @property
    def num_devices(self) -> int:
        """Devices the mesh needs."""
        return self.data * self.pipeline * self.tensor

    @property
    def num_microbatches(self) -> int:
        """Microbatches per pipelined step (at least one per stage keeps every stage busy)."""
        return self.microbatches or self.pipeline


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool on the device and the prefix cache tiered below it (host DRAM, then local disk)."""

    page_size: int = 16
    num_pages: int = 256
    dtype: str = "float32"
    # Reuse the KV of full pages across requests that share a prefix (a hash chain over page tokens). Off also
    # turns off the host and disk tiers, which only hold prefix pages.
    prefix_caching: bool = True
    # Host DRAM for pages evicted from the device (and swapped-out sequences); 0 disables the host tier.
    host_bytes: int = 1 << 30
    # A directory for pages evicted from the host; "" disables the disk tier. Pages live in a subdirectory named
    # after the cache salt (model, weights, layout), so a restart with the same model reuses them, and disk_bytes
    # caps each such subdirectory.
    disk_path: str = ""
    disk_bytes: int = 8 << 30
    # Mixed into every page key: servers with different salts (e.g. adapters, tenants) never share pages.
    salt: str = ""

    def __post_init__(self) -> None:
        _require(self.page_size > 0 and self.page_size & (self.page_size - 1) == 0, "cache.page_size",
                 f"must be a power of two, got {self.page_size}")
        _require(self.num_pages >= 2, "cache.num_pages", f"must be >= 2 (page 0 is reserved), got {self.num_pages}")
        _require(self.dtype in DTYPES, "cache.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.host_bytes >= 0, "cache.host_bytes", f"must be >= 0, got {self.host_bytes}")
        _require(self.disk_bytes >= 0, "cache.disk_bytes", f"must be >= 0, got {self.disk_bytes}")

    @property
    def has_host_tier(self) -> bool:
        """Whether pages leave the device at all (a disk tier sits behind a host tier, possibly of size 0)."""
        return self.prefix_caching and (self.host_bytes > 0 or bool(self.disk_path))


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Shape buckets of the compiled steps; every bucket is compiled once, at start when `warmup` is set."""

    max_seq_len: int = 512
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)
    prefill_buckets: tuple[int, ...] = (16, 64, 256)
    max_logprobs: int = 5
    warmup: bool = True
    # The hand-written CPU kernels (jaxserve/kernels) for matmuls and attention: "auto" uses them on a CPU
    # backend with a float32 model and KV cache when they build here, "on" fails at start when they cannot be
    # used, "off" keeps the pure-JAX path.
    cpu_kernels: str = "auto"

    def __post_init__(self) -> None:
        _require(self.max_seq_len > 0, "runner.max_seq_len", f"must be > 0, got {self.max_seq_len}")
        _require(self.cpu_kernels in ("auto", "on", "off"), "runner.cpu_kernels",
                 f"must be one of auto, on, off; got {self.cpu_kernels!r}")
        for f in ("batch_buckets", "prefill_buckets"):
            v = getattr(self, f)
            _require(len(v) > 0 and all(b > 0 for b in v) and list(v) == sorted(set(v)), f"runner.{f}",
                     f"must be a non-empty increasing list of positive sizes, got {list(v)}")
        _require(0 <= self.max_logprobs <= 20, "runner.max_logprobs", f"must be in [0, 20], got {self.max_logprobs}")

    @property
    def max_batch(self) -> int:
        """Largest number of rows in one decode step."""
        return self.batch_buckets[-1]

    @property
    def max_chunk(self) -> int:
        """Largest number of prompt tokens in one prefill step."""
        return self.prefill_buckets[-1]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Continuous-batching limits of the engine loop (rows and chunk sizes come from the runner's buckets)."""

    # Tokens computed per step: one per decode row plus every prefill chunk (bounds a step's latency).
    max_step_tokens: int = 512
    # Requests queued beyond this are refused (RESOURCE_EXHAUSTED at the server).
    max_waiting: int = 256
    # "swap" keeps a preempted sequence's KV (needs a host tier), "recompute" prefills it again, "auto" swaps
    # sequences that computed at least swap_min_tokens (a shorter one is cheaper to recompute than to copy).
    preemption: str = "auto"
    swap_min_tokens: int = 64
    # "static" runs each batch to its last token before admitting more (a baseline for benchmarks).
    batching: str = "continuous"
    # Plan and dispatch each step while the previous one runs on the device, reading its ids afterwards (see
    # jaxserve/engine.py); false runs each step to completion before planning the next.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        _require(self.batching in ("continuous", "static"), "engine.batching",
                 f"must be 'continuous' or 'static', got {self.batching!r}")
        _require(self.max_step_tokens > 0, "engine.max_step_tokens", f"must be > 0, got {self.max_step_tokens}")
        _require(self.max_waiting > 0, "engine.max_waiting", f"must be > 0, got {self.max_waiting}")
        _require(self.preemption in ("auto", "swap", "recompute"), "engine.preemption",
                 f"must be 'auto', 'swap' or 'recompute', got {self.preemption!r}")
        _require(self.swap_min_tokens >= 0, "engine.swap_min_tokens", f"must be >= 0, got {self.swap_min_tokens}")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The gRPC front: address, request limits, TLS and bearer-token auth, shutdown grace."""

    host: str = "127.0.0.1"
    port: int = 50051
    # 0 disables the Prometheus endpoint.
    metrics_port: int = 0
    # 0 means the runner's max_seq_len.
    max_prompt_tokens: int = 0
    # 0 means the runner's max_seq_len.
    max_tokens_cap: int = 0
    max_message_bytes: int = 4 * 1024 * 1024
    max_stop_strings: int = 16
    tls_cert: str = ""
    tls_key: str = ""
    # Clients must send `authorization: Bearer <token>` when set.
    auth_token: str = ""
    grace_period_s: float = 30.0

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "server.port", f"must be in [0, 65536), got {self.port}")
        _require(0 <= self.metrics_port < 65536, "server.metrics_port",
                 f"must be in [0, 65536), got {self.metrics_port}")
        for f in ("max_prompt_tokens", "max_tokens_cap", "max_stop_strings"):
            _require(getattr(self, f) >= 0, f"server.{f}", f"must be >= 0, got {getattr(self, f)}")
        _require(self.max_message_bytes >= 1024, "server.max_message_bytes",
                 f"must be >= 1024, got {self.max_message_bytes}")
        _require(bool(self.tls_cert) == bool(self.tls_key), "server.tls_cert",
                 "tls_cert and tls_key must be given together")
        _require(self.grace_period_s >= 0, "server.grace_period_s", f"must be >= 0, got {self.grace_period_s}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where weights come from: an orbax directory, or a seeded random init when `path` is empty."""

    path: str = ""
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """`byte` for the file-free byte-level tokenizer, else a path to tokenizer.json or a sentencepiece .model."""

    path: str = "byte"


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a replica needs; one frozen object handed down from the entry point."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    cache: CacheConfig = CacheConfig()
    runner: RunnerConfig = RunnerConfig()
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()

    def __post_init__(self) -> None:
        m, mesh = self.model, self.mesh
        _require(m.num_layers % mesh.pipeline == 0, "mesh.pipeline",
                 f"must divide model.num_layers={m.num_layers}, got {mesh.pipeline}")
        _require(m.num_heads % mesh.tensor == 0, "mesh.tensor",
                 f"must divide model.num_heads={m.num_heads}, got {mesh.tensor}")
        _require(m.num_kv_heads % mesh.tensor == 0 or mesh.tensor % m.num_kv_heads == 0, "mesh.tensor",
                 f"must divide or be a multiple of model.num_kv_heads={m.num_kv_heads}, got {mesh.tensor}")
        _require(m.intermediate_size % mesh.tensor == 0, "mesh.tensor",
                 f"must divide model.intermediate_size={m.intermediate_size}, got {mesh.tensor}")
        _require(m.vocab_size % mesh.tensor == 0, "mesh.tensor",
                 f"must divide model.vocab_size={m.vocab_size}, got {mesh.tensor}")
        _require(self.runner.max_seq_len <= m.max_position, "runner.max_seq_len",
                 f"must be <= model.max_position={m.max_position}, got {self.runner.max_seq_len}")
        _require(self.engine.max_step_tokens >= self.runner.max_batch, "engine.max_step_tokens",
                 f"must be >= runner max batch {self.runner.max_batch} so every row decodes each step, "
                 f"got {self.engine.max_step_tokens}")
        for b in self.runner.batch_buckets:
            _require(b % mesh.num_microbatches == 0 or b < mesh.num_microbatches, "runner.batch_buckets",
                     f"{b} must be a multiple of the {mesh.num_microbatches} pipeline microbatches (or smaller)")

    @property
    def max_pages_per_seq(self) -> int:
        """Block-table width: pages needed by the longest sequence."""
        return -(-self.runner.max_seq_len // self.cache.page_size)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Checks `value` against the annotation `typ`, converting only where no information is lost."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        _require(isinstance(value, list | tuple), name, f"expected a list, got {value!r}")
        (elem, _) = typing.get_args(typ)
        return tuple(_coerce(v, elem, f"{name}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        _require(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if typ is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
        return value
    if typ is float:
        _require(isinstance(value, int | float) and not isinstance(value, bool), name,
                 f"expected a number, got {value!r}")
        return float(value)
    if typ is str:
        _require(isinstance(value, str), name, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {typ}")


def _build_section(cls: type, values: Mapping[str, Any], section: str) -> Any:
    hints = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{section}.{key}: unknown field (known: {', '.join(known)})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{section}: {e}") from e


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.field=value, e.g. model.num_layers=4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts[0], parts[1], value


def _resolve_paths(raw: dict[str, dict[str, Any]], base_dir: str) -> None:
    """Relative checkpoint and tokenizer paths in a file are relative to that file, so configs work from any cwd."""
    for section, key in (("checkpoint", "path"), ("tokenizer", "path"), ("server", "tls_cert"), ("server", "tls_key")):
        value = raw.get(section, {}).get(key)
        if isinstance(value, str) and value and value != "byte" and not os.path.isabs(value):
            raw[section][key] = os.path.normpath(os.path.join(base_dir, value))


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a TOML config file (or the defaults when `path` is None) and applies `section.field=value` overrides."""
    raw: dict[str, dict[str, Any]] = {}
    if path:
        try:
            with open(path, "rb") as f:
                loaded = tomllib.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path!r} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from e
        for section, values in loaded.items():
            _require(isinstance(values, dict), section, "expected a table of fields")
            raw[section] = dict(values)
        _resolve_paths(raw, os.path.dirname(os.path.abspath(path)))
    for text in overrides:
        section, key, value = _parse_override(text)
        raw.setdefault(section, {})[key] = value
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = _field_types(Config)
    kwargs = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(sections)})")
        kwargs[section] = _build_section(hints[section], values, section)
    return Config(**kwargs)


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts (for logging and GetModelInfo)."""
    return dataclasses.asdict(config)
