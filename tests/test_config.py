"""Config files and overrides: every shipped config loads; bad fields are named in the error."""

import glob

import pytest

from jaxserve.config import ConfigError, load_config


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.toml")))
def test_every_shipped_config_loads(path: str) -> None:
    config = load_config(path)
    assert config.model.num_layers % config.mesh.pipeline == 0


def test_overrides_change_any_field_and_parse_as_toml() -> None:
    c = load_config("configs/tiny.toml", ["model.num_layers=8", "model.dtype=bfloat16", "runner.batch_buckets=[2, 4]",
                                          "model.rms_norm_eps=1e-6", "runner.warmup=false", "model.name=x"])
    assert (c.model.num_layers, c.model.dtype, c.runner.batch_buckets) == (8, "bfloat16", (2, 4))
    assert (c.model.rms_norm_eps, c.runner.warmup, c.model.name) == (1e-6, False, "x")


@pytest.mark.parametrize(("override", "message"), [
    ("model.num_layer=3", "model.num_layer: unknown field"),
    ("modle.num_layers=3", "modle: unknown section"),
    ("model.num_layers=0", "model.num_layers: must be > 0"),
    ("model.num_layers=two", "model.num_layers: expected an integer"),
    ("model.dtype=float64", "model.dtype: must be one of"),
    ("cache.page_size=12", "cache.page_size: must be a power of two"),
    ("mesh.tensor=3", "mesh.tensor: must divide model.num_heads"),
    ("mesh.pipeline=3", "mesh.pipeline: must divide model.num_layers"),
    ("runner.max_seq_len=100000", "runner.max_seq_len: must be <= model.max_position"),
    ("runner.batch_buckets=[8, 4]", "runner.batch_buckets: must be a non-empty increasing list"),
    ("model.num_kv_heads=3", "model.num_kv_heads: must divide model.num_heads"),
    ("server.port=70000", "server.port: must be in"),
    ("model.rope_scaling=yarn", "model.rope_scaling: must be one of"),
    ("nonsense", "expected section.field=value"),
])
def test_bad_values_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.toml", [override])


def test_missing_file_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.toml")
