"""Where a run's arrays live: one device, or a mesh whose shardings follow `vishwam.parallel`'s rules.

Without `RunConfig.mesh` a single device trains alone and several devices share the batch
(`data` axis). A mesh from the config (e.g. `{"data": 2, "expert": 4}`) shards the state by
`vishwam.parallel` rules and the step runs under `jax.set_mesh`, so MoE layers go
expert-parallel. With several processes each one places its own rows of every batch.
"""

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from ..config import ModelConfig, TrainConfig
from ..errors import InvalidValueError
from ..parallel.sharding import DEFAULT_RULES, Rule, shard_model, tree_shardings


class Placement:
    """The devices of a run (`mesh`, or the single `device`) and how trees and batches go onto them."""

    def __init__(self, sizes: Mapping[str, int] | None, model_config: ModelConfig | None, config: TrainConfig,
                 rules: Sequence[Rule] = DEFAULT_RULES):
        self.mesh, self.device = _devices(sizes, model_config, config)
        self.rules = rules

    def place_tree(self, tree):
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        return shard_model(tree, self.mesh, self.rules)

    def shardings(self, arrays):
        """The shardings `place_tree` gives a tree of arrays (or `ShapeDtypeStruct`s)."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.device)
        return tree_shardings(arrays, self.mesh, self.rules)

    def place_batch(self, batch: Mapping[str, Any]) -> dict:
        if self.mesh is None:
            return jax.device_put(dict(batch), self.device)
        from ..parallel import make_global_batch

        return make_global_batch(dict(batch), self.mesh)

    def context(self):
        """The mesh the step runs under (`jax.set_mesh`), or nothing on one device."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def devices(self) -> list:
        return [self.device] if self.mesh is None else list(self.mesh.devices.flat)

    def local_devices(self) -> list:
        return [d for d in self.devices() if d.process_index == jax.process_index()]

    def describe(self) -> str:
        devices = self.devices()
        text = f"{len(devices)} x {devices[0].device_kind}"
        if self.mesh is not None:
            text += f", mesh {dict(self.mesh.shape)}"
        return text


def _devices(sizes: Mapping[str, int] | None, model_config: ModelConfig | None,
             config: TrainConfig) -> tuple[jax.sharding.Mesh | None, jax.Device | None]:
    from ..parallel import check_mesh, make_mesh
    from ..parallel.sharding import batch_shards

    devices = jax.devices()
    if sizes is None:
        sizes = {"data": -1} if len(devices) > 1 else {}
    if -1 not in sizes.values():
        count = math.prod(sizes.values()) if sizes else 1
        if count > len(devices):
            raise InvalidValueError(f"RunConfig.mesh={dict(sizes)} needs {count} devices; this process sees "
                                    f"{len(devices)} ({devices[0].platform}). Use smaller axis sizes or -1 to fill.")
        devices = devices[:count]
    if len(devices) == 1:
        return None, devices[0]
    mesh = make_mesh(sizes, devices=devices)
    if model_config is not None:
        check_mesh(model_config, mesh)
    shards = batch_shards(mesh)
    if config.batch_size % shards:
        raise InvalidValueError(f"VishwamAITrainer: batch_size={config.batch_size} is not divisible by the "
                                f"mesh's {shards} batch shards ({dict(mesh.shape)}); use a multiple of {shards}.")
    return mesh, None
