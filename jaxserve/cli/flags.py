"""The absl flags every jaxserve CLI shares: `--config` (a TOML file from configs/) and `--set` overrides -> Config.

Only entry-point modules call these; everything below them receives the Config.
"""

from __future__ import annotations

from absl import app, flags

from jaxserve.config import Config, ConfigError, load_config


def define_config_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--config` and `--set` (idempotent, so entry points sharing a process may both call it)."""
    if "config" not in flag_values:
        flags.DEFINE_string("config", None, "TOML config file (see configs/); defaults apply when omitted.",
                            flag_values=flag_values)
    if "set" not in flag_values:
        flags.DEFINE_multi_string("set", [], "Override one field, section.field=value (repeatable), e.g. "
                                  "--set mesh.tensor=2 --set model.dtype=bfloat16.", flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Config:
    """The Config named by `--config` with every `--set` applied.

    A bad file or override raises `app.UsageError` carrying the field and the problem, which `app.run` prints
    with a short usage line before exiting with status 1 (no traceback).
    """
    try:
        return load_config(flag_values["config"].value, flag_values["set"].value)
    except ConfigError as e:
        raise app.UsageError(f"bad config: {e}") from e
