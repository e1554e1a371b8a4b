"""Sharding rules: parameter paths -> `PartitionSpec`s, batch specs, per-device bytes.

A rule is `(regex, logical_spec)`. The regex is searched in a leaf's dotted path
(`stages.0.blocks.0.mlp.experts.gate`); the first match wins and unmatched leaves
are replicated. `logical_spec` names the mesh axis of each of the array's
*trailing* dims, so one rule covers a plain layer `[E, D, F]`, a stacked
(scanned) layer `[repeats, E, D, F]` and an optimiser's moments of either: the
extra leading dims are left unsharded. Optax states mirror the parameters
(`mu.stages.0....`), so the same rules shard them (`shard_model(opt_state, mesh)`).

Per axis:
- `fsdp`: the hidden (model) dim of every large weight (ZeRO-3 style: gathered
  for use, gradients reduce-scattered, by the compiler); for the weights every
  token uses (attention, dense MLPs, embedding, head) together with `expert`,
  which is one more data-parallel axis outside the MoE layers.
- `tensor`: attention heads (q/k/v output dims, o input dim), the ffn dim of
  MLPs and experts, the vocabulary.
- `expert`: the experts axis of the stacked expert weights (expert parallelism).
- Batches are split over `data`, `fsdp` and `expert`: outside the MoE layers the
  expert axis is one more data-parallel axis, and inside them every device sends
  its own tokens to the experts' devices (see `vishwam.parallel.expert`).

A dim that an axis does not divide stays unsharded on that axis (correct, just
less spread), except the experts dim: experts must split evenly over `expert`,
else `ValueError`.

Multi-host
----------
One process per host, each seeing its local devices. Start every process with

    import jax
    jax.distributed.initialize()   # or coordinator_address="host0:1234",
                                   #    num_processes=N, process_id=i
    mesh = make_mesh(data=-1, expert=8)     # over all hosts' devices (jax.devices())

before any other JAX call (on Cloud TPU / SLURM / Kubernetes the arguments are
found automatically). Every process runs the same program; each loads only its
own slice of the data and turns it into one global array with
`make_global_batch(local_batch, mesh)`. Parameters made under the same key are
identical on every host, so `shard_model(model, mesh)` needs no broadcast.
"""

import math
import re
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..arrays import is_array_like
from ..errors import InvalidValueError
from .mesh import BATCH_AXES as BATCH_AXES
from .mesh import axis_size, check_experts_divisible

Rule = tuple[str, tuple[str | tuple[str, ...] | None, ...]]

ZERO = ("fsdp", "expert")
"""Axes the dense weights are split over (a logical entry may name several mesh axes)."""

DEFAULT_RULES: tuple[Rule, ...] = (
    (r"(^|\.)experts\.(gate|up)$", ("expert", "fsdp", "tensor")),  # [E, D, F]
    (r"(^|\.)experts\.down$", ("expert", "tensor", "fsdp")),  # [E, F, D]
    # The router ([D, E]), the selection bias and the shared experts' gate ([D, 1]) are tiny
    # and read by every token.
    (r"(^|\.)(router|selection_bias|shared_gate)$", ()),
    # Weights every token uses are split over `fsdp` and `expert` together: outside the MoE
    # layers the expert axis is data parallelism, so ZeRO-3 spans both.
    (r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", (ZERO, "tensor")),  # [D, H*hd] / [D, F]
    (r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", ("tensor",)),
    (r"(^|\.)(o_proj|down_proj)\.weight$", ("tensor", ZERO)),  # [H*hd, D] / [F, D]
    # Latent attention: the down-projections keep the latent whole, the up-projections split the heads.
    (r"(^|\.)(q_a_proj|kv_a_proj)\.weight$", (ZERO, None)),  # [D, rank]
    (r"(^|\.)(q_b_proj|kv_b_proj)\.weight$", (ZERO, "tensor")),  # [rank, H*(n+r)] / [rank, H*(n+v)]
    (r"(^|\.)eh_proj\.weight$", (ZERO, None)),  # multi-token prediction's [2D, D]
    (r"(^|\.)embed$", ("tensor", ZERO)),  # [V, D]
    (r"(^|\.)lm_head\.weight$", (ZERO, "tensor")),  # [D, V]
)
"""Rules for `VishwamAI` (norm scales and biases not listed are replicated)."""


def path_string(path: Sequence) -> str:
    """Dotted form of a `jax.tree_util` key path: `stages.0.blocks.1.attn.q_proj.weight`."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def rules_for(model) -> Sequence[Rule]:
    """The sharding rules of a model: its own `sharding_rules` attribute (rules in the format
    above, for a user's module whose parameters are named otherwise), else `DEFAULT_RULES`."""
    rules = getattr(model, "sharding_rules", None)
    return DEFAULT_RULES if rules is None else tuple(rules)


def partition_spec(path: str, shape: Sequence[int], mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> P:
    """The `PartitionSpec` of one array at dotted `path` with `shape` on `mesh`."""
    for pattern, logical in rules:
        if re.search(pattern, path):
            break
    else:
        return P()
    if len(logical) > len(shape):  # e.g. a factored optimiser statistic: too small to bother
        return P()
    names = (None,) * (len(shape) - len(logical)) + tuple(logical)
    spec = []
    for dim, axis in zip(shape, names):
        if isinstance(axis, tuple):
            spec.append(_split_over(dim, axis, mesh))
            continue
        size = axis_size(mesh, axis) if axis is not None else 1
        if axis == "expert" and size > 1:
            check_experts_divisible(dim, mesh)
        spec.append(axis if size > 1 and dim % size == 0 else None)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _split_over(dim: int, axes: tuple[str, ...], mesh) -> str | tuple[str, ...] | None:
    """The spec entry splitting `dim` over as many of `axes` (in order, sizes > 1) as divide it."""
    used = [axis for axis in axes if axis_size(mesh, axis) > 1]
    while used and dim % math.prod(axis_size(mesh, axis) for axis in used):
        used.pop()
    return None if not used else used[0] if len(used) == 1 else tuple(used)


def tree_specs(tree, mesh, rules: Sequence[Rule] = DEFAULT_RULES):
    """`PartitionSpec` for every array (or `ShapeDtypeStruct`) leaf of `tree`; other leaves `None`."""
    def spec(path, leaf):
        if is_array_like(leaf):
            return partition_spec(path_string(path), leaf.shape, mesh, rules)
        return None

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree, mesh, rules: Sequence[Rule] = DEFAULT_RULES):
    """`NamedSharding`s for the array leaves of `tree` (e.g. for `jax.jit` out_shardings
    or `eqx.filter_shard`); other leaves `None`."""
    return jax.tree_util.tree_map(
        lambda s: None if s is None else NamedSharding(mesh, s),
        tree_specs(tree, mesh, rules), is_leaf=lambda s: s is None or isinstance(s, P),
    )


def shard_model(tree, mesh, rules: Sequence[Rule] = DEFAULT_RULES):
    """Place every array leaf of `tree` (a model, an optimiser state, a train state)
    on `mesh` by `rules`; non-array leaves pass through. Outside jit it is a
    `jax.device_put` (no compile); inside, a sharding constraint. On a mesh
    spanning several processes every process must pass the same values (e.g. made
    from the same key): each one keeps the pieces its own devices hold."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    shardings = tree_shardings(arrays, mesh, rules)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(arrays)):
        arrays = jax.lax.with_sharding_constraint(arrays, shardings)
    elif all(s.is_fully_addressable for s in jax.tree_util.tree_leaves(shardings)):
        arrays = jax.device_put(arrays, shardings)
    else:
        arrays = jax.tree_util.tree_map(_put_from_every_process, arrays, shardings)
    return eqx.combine(arrays, static)


def _put_from_every_process(x, sharding: NamedSharding) -> jax.Array:
    # `device_put` refuses devices of other processes; each process supplies its own shards.
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_from_every_process(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def batch_axes(mesh) -> tuple[str, ...]:
    """Mesh axes the batch dim is split over: those of `data, fsdp, expert` the mesh has."""
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def batch_spec(mesh, ndim: int = 2) -> P:
    """`PartitionSpec` of a `[batch, ...]` array with `ndim` dims: batch over `batch_axes`."""
    return P(batch_axes(mesh), *([None] * (ndim - 1)))


def batch_shards(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | Mapping[str, int]) -> int:
    """How many slices a batch is split into: the product of the batch axes' sizes.

    `mesh` may also be a mapping of axis sizes (a candidate mesh not built yet).
    """
    sizes = mesh if isinstance(mesh, Mapping) else dict(mesh.shape)
    return math.prod(sizes.get(axis, 1) for axis in BATCH_AXES)


def _check_batch(shape, mesh, name: str):
    shards = batch_shards(mesh)
    if not shape or shape[0] % shards:
        sizes = " x ".join(f"{axis}={axis_size(mesh, axis)}" for axis in batch_axes(mesh))
        raise InvalidValueError(
            f"{name}: batch dim of shape {tuple(shape)} is not divisible by {sizes} = {shards} "
            f"batch shards; use a (global) batch size that is a multiple of {shards}."
        )


def shard_batch(batch, mesh):
    """Place every array leaf of `batch` (`[batch, ...]` arrays) on `mesh`, split by `batch_spec`."""
    def put(x):
        if not eqx.is_array(x):
            return x
        _check_batch(x.shape, mesh, "shard_batch")
        return jax.device_put(x, NamedSharding(mesh, batch_spec(mesh, x.ndim)))

    return jax.tree_util.tree_map(put, batch)


def make_global_batch(local_batch, mesh, spec: P | None = None):
    """Assemble each process's slice of the batch into global arrays on `mesh`.

    Every process passes its own `local_batch` (a pytree of `[local_batch, ...]`
    numpy or JAX arrays, the rows its devices will hold under `spec`, default
    `batch_spec`); the result's leaves are global `[processes * local_batch, ...]`
    arrays (`jax.make_array_from_process_local_data`). With one process the local
    batch is the global batch. See this module's docstring for launching hosts.
    """
    def make(x):
        x = np.asarray(x)
        leaf_spec = batch_spec(mesh, x.ndim) if spec is None else spec
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        if spec is None:
            _check_batch(global_shape, mesh, "make_global_batch")
        return jax.make_array_from_process_local_data(NamedSharding(mesh, leaf_spec), x, global_shape)

    return jax.tree_util.tree_map(make, local_batch)


def per_device_bytes(tree) -> dict[jax.Device, int]:
    """Bytes each device holds of the array leaves of `tree`, from their shards."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
