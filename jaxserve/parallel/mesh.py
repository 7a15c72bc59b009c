"""The device mesh and the ONE table that maps logical axis names to mesh axes.

Model code names axes logically ("heads", "mlp", "vocab", "layers"); this module alone knows which mesh axis each
lands on, so changing a parallelism strategy is an edit to `LOGICAL_RULES`, nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import ConfigError, MeshConfig

MESH_AXES = ("data", "pipeline", "tensor")

# Logical axis -> mesh axis (None: replicated). Megatron-style tensor parallelism: attention heads, KV heads, MLP
# hidden units and the vocabulary split over `tensor`; the stacked layer axis splits over `pipeline`, so each stage
# holds a contiguous block of layers; KV pages follow their layer.
LOGICAL_RULES: dict[str, str | None] = {
    "layers": "pipeline",
    "vocab": "tensor",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "kv_pages": None,
    "batch": None,
}


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry the logical names `axes`.

    Refuses a mapping that puts two logical axes of one array onto the same mesh axis, naming both, because XLA
    would otherwise silently shard neither or reshard on every use.
    """
    mesh_axes: list[str | None] = []
    seen: dict[str, str] = {}
    for name in axes:
        if name is None:
            mesh_axes.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        target = LOGICAL_RULES[name]
        if target is not None:
            if target in seen:
                raise ValueError(
                    f"logical axes {seen[target]!r} and {name!r} of one array both map to mesh axis {target!r}")
            seen[target] = name
        mesh_axes.append(target)
    return PartitionSpec(*mesh_axes)


def mesh_axis(logical: str) -> str | None:
    """The mesh axis a logical axis is split over (None when replicated)."""
    return LOGICAL_RULES[logical]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh of shape (data, pipeline, tensor) over the first `config.num_devices` devices.

    Uses the `Mesh` constructor (Auto axis types): the model runs under `shard_map`, which manages its axes itself.
    """
    devices = list(devices if devices is not None else jax.devices())
    if config.data != 1:
        raise ConfigError(
            f"mesh.data: data parallelism inside one replica is not supported yet, got {config.data}; "
            "run several replicas instead")
    if len(devices) < config.num_devices:
        raise ConfigError(
            f"mesh: data*pipeline*tensor = {config.num_devices} devices needed, only {len(devices)} available")
    grid = np.array(devices[: config.num_devices]).reshape(config.data, config.pipeline, config.tensor)
    return Mesh(grid, MESH_AXES)


def named_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
    """NamedSharding on `mesh` for an array with logical axis names `axes`."""
    return NamedSharding(mesh, logical_to_spec(axes))
