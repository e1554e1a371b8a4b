"""Device meshes with the named axes `data`, `fsdp`, `expert`, `tensor`.

Every mesh made here has all four axes (size 1 where unused), in that order, so
the same sharding rules and specs work on 1 device, 8 simulated CPU devices or a
pod. The innermost axes (`tensor`, then `expert`) get neighbouring devices, which
share the fastest links on real hardware.

Axis types are `Auto`: the compiler propagates shardings through ordinary
code, and `jax.shard_map` (expert parallelism) accepts inputs in any layout.
(`jax.make_mesh` defaults to `Explicit` axes, under which an unsharded input to
`shard_map` or a sort over a sharded batch fails.)
"""

import math
from collections.abc import Mapping, Sequence

import jax

from ..errors import InvalidValueError

AXES = ("data", "fsdp", "expert", "tensor")
"""Mesh axis names, outermost first."""

BATCH_AXES = AXES[:3]
"""The axes a batch is split over: `data`, `fsdp` and `expert` (all but `tensor`)."""

TENSOR_AXIS = AXES[3]
"""The tensor-parallel axis: attention heads and the ffn dim are split over it."""


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes for `num_devices` devices: missing axes are 1, one axis may be -1 (fill).

    Raises `ValueError` naming the fix when an axis is unknown, a size is not a
    positive integer (or -1), or the sizes do not multiply to `num_devices`.
    """
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise InvalidValueError(f"make_mesh: unknown axis name(s) {unknown}; the axes are {list(AXES)}.")
    resolved = {axis: sizes.get(axis, 1) for axis in AXES}
    for axis, size in resolved.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size <= 0 and size != -1):
            raise InvalidValueError(f"make_mesh: {axis}={size!r} must be a positive integer, or -1 to fill.")
    fill = [axis for axis, size in resolved.items() if size == -1]
    if len(fill) > 1:
        raise InvalidValueError(f"make_mesh: only one axis may be -1 (fill), got {fill}; give the others sizes.")
    fixed = math.prod(size for size in resolved.values() if size != -1)
    shown = " x ".join(f"{axis}={size}" for axis, size in resolved.items())
    if fill:
        if num_devices % fixed:
            raise InvalidValueError(
                f"make_mesh: cannot fill {fill[0]}=-1: the other axes ({shown}) multiply to {fixed}, "
                f"which does not divide the {num_devices} devices; pick sizes whose product divides {num_devices}."
            )
        resolved[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise InvalidValueError(
            f"make_mesh: axis sizes {shown} multiply to {fixed}, but there are {num_devices} devices; "
            f"make the product {num_devices}, or set one axis to -1 to fill the rest."
        )
    return resolved


def make_mesh(
    sizes: Mapping[str, int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    **axis_sizes: int,
) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) with axes `data, fsdp, expert, tensor` (Auto types).

    Sizes come from a mapping (e.g. a config's `{"data": 2, "expert": 4}`) and/or
    keywords (`make_mesh(data=2, expert=-1)`); keywords win. Missing axes are 1,
    one axis may be -1 to take whatever the others leave, and the sizes must
    multiply to the number of devices.

    Examples:
        make_mesh(expert=8)                      # 8 devices, all on the expert axis
        make_mesh({"data": 2, "expert": 4})
        make_mesh(data=-1, tensor=2)             # data = devices / 2
    """
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_axis_sizes({**(sizes or {}), **axis_sizes}, len(devices))
    shape = tuple(resolved[axis] for axis in AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError) as error:
        if "allow_split_physical_axes" not in str(error):
            raise
    # A logical axis that is not a product of whole physical axes (expert=8 on a 4x4x4
    # v5p cube): split physical axes, as jax.make_mesh already does on v5e.
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, AXES, axis_types=auto)


def axis_size(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, axis: str) -> int:
    """Size of `axis` in `mesh`; 1 when the mesh has no such axis."""
    return dict(mesh.shape).get(axis, 1)


def check_experts_divisible(num_experts: int, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> None:
    """Each device of the `expert` axis must hold the same whole number of experts."""
    ep = axis_size(mesh, "expert")
    if num_experts % ep:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise InvalidValueError(
            f"num_experts={num_experts} is not divisible by the mesh's expert axis size {ep}: each device "
            f"must hold num_experts / expert whole experts. Use an expert axis size in {divisors} "
            f"(e.g. make_mesh(expert={max(d for d in divisors if d <= ep)}, data=-1)) or change num_experts."
        )


def check_mesh(config, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> None:
    """Raise `ValueError` if `config` (a `ModelConfig`) cannot run on `mesh`."""
    if config.is_moe:
        check_experts_divisible(config.num_experts, mesh)
