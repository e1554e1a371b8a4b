"""Will it fit, and how fast could it be: ahead-of-time compiles of the whole train step
for abstract TPU pods and GPU nodes, and a roofline estimate.

- `compile_train_step` lowers and compiles the real train step (`vishwam.train.step`,
  optimiser included) from `vishwam.train.state.abstract_train_state` for any mesh, e.g.
  one over `tpu_devices("v5p:4x4x4")` or `gpu_devices("h100:64")`
  (`topology_devices` takes either): with libtpu or JAX's CUDA plugin installed, the XLA
  TPU or GPU compiler runs on a machine without the accelerator and reports per-chip
  memory. Every backend choice inside (attention kernels, MoE dispatch) follows the devices
  compiled for, not this host.
- `plan` / `search_plans` add the model's FLOPs (`vishwam.model.flops`) and a roofline
  **estimate** of the step time from the chips' published peaks. Nothing here is a
  measured TPU or GPU time.
"""

import contextlib
import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .arrays import is_abstract
from .config import ModelConfig, TrainConfig
from .errors import InvalidValueError
from .files import atomic_write_text
from .gpu_targets import gpu_devices as gpu_devices
from .gpu_targets import is_gpu_topology
from .memory import memory_stats
from .model.flops import CHIPS as CHIPS
from .model.flops import Chip as Chip
from .model.flops import chip_of as chip_of
from .model.flops import estimate_peak_flops as estimate_peak_flops
from .model.flops import model_flops_per_token as model_flops_per_token
from .model.params import count_parameters
from .nn.stack import REMAT
from .parallel.mesh import AXES, make_mesh, resolve_axis_sizes
from .parallel.sharding import DEFAULT_RULES, Rule, batch_shards
from .train.state import abstract_batch as abstract_batch
from .train.state import abstract_train_state as abstract_train_state
from .train.state import fresh_train_state as fresh_train_state
from .train.state import init_sharded_state as init_sharded_state
from .train.step import train_update

# ---------------------------------------------------------------- compiling


def compile_train_step(
    model_config: ModelConfig,
    train_config: TrainConfig,
    mesh: jax.sharding.Mesh,
    rules: Sequence[Rule] = DEFAULT_RULES,
):
    """Lower and compile the whole train step (forward, backward, AdamW update, state
    donated) for `mesh`, from abstract inputs only. Returns `(compiled, seconds)`;
    `compiled.as_text()` is the program that would run."""
    update = train_update(model_config, train_config)
    state = abstract_train_state(model_config, train_config, mesh, rules)
    arrays, static = eqx.partition(state, is_abstract)

    def run(arrays, batch):
        new_state, metrics = update((batch, None), eqx.combine(arrays, static))
        return eqx.filter(new_state, eqx.is_array), metrics

    start = time.perf_counter()
    with jax.set_mesh(mesh), no_persistent_cache_unless_runnable(mesh):
        compiled = jax.jit(run, donate_argnums=0).lower(arrays, abstract_batch(train_config, mesh)).compile()
    return compiled, time.perf_counter() - start


@contextlib.contextmanager
def no_persistent_cache_unless_runnable(mesh: jax.sharding.Mesh):
    """An executable for a platform this process has no client for (TPU or GPU programs
    compiled on a CPU host) cannot be read back from JAX's persistent compile cache (a
    warning and a recompile every time): keep such compiles out of it. (Writes only: JAX
    decides once per process whether to look the cache up, so an entry written by a compile
    outside this context still warns when read.)"""
    if mesh.devices.flat[0].platform == jax.default_backend():
        yield
        return
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


def topology_devices(topology: str, gpu_target_config: str | None = None) -> list[jax.Device]:
    """The abstract devices of a GPU topology (`h100:64`, `gpu_devices`) or a TPU one
    (`v5p:4x4x4`, `tpu_devices`); with `gpu_target_config` (a `GpuTargetConfigProto`
    text) always GPUs of that description."""
    if gpu_target_config is not None or is_gpu_topology(topology):
        return gpu_devices(topology, gpu_target_config)
    return tpu_devices(topology)


def tpu_devices(topology: str) -> list[jax.Device]:
    """The abstract devices of a TPU topology such as `v5p:4x4x4` (64 chips),
    `v5e:16x16` (256) or `v6e:8x8` (64); needs libtpu, not a TPU."""
    generation, sep, shape = topology.partition(":")
    dims = shape.split("x") if sep else []
    if not sep or not dims or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise InvalidValueError(f"topology {topology!r}: expected GENERATION:SHAPE such as v5p:4x4x4, v5e:4x4 or "
                                "v6e:8x8 (TPU), or h100:64, h200:8x8 (GPU).")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install \"jax[tpu]\" (no TPU "
                           "needed; it brings the XLA TPU compiler).") from None
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock file on first use unless told otherwise; compiling
    # touches no TPU, so several processes (tests, planners) may do it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        with _quiet_native_stderr():
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as error:  # libtpu raises XlaRuntimeError / ValueError with its own text
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidValueError(f"topology {topology!r} is not one libtpu knows ({first}); use e.g. v5p:2x2x1, "
                                "v5p:4x4x4, v5e:2x2, v5e:16x16, v6e:8x8 (3 dims for v4/v5p, 2 for v5e/v6e).") from None
    return list(desc.devices)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 for a native call: libtpu's first use prints a screen
    of warnings about TPU hosts it cannot find, which do not apply to compiling."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ----------------------------------------------------------------- planning

@dataclasses.dataclass(frozen=True)
class Plan:
    """One configuration's compiled footprint and estimated speed (per chip unless named).

    `estimated_step_s` is a roofline **estimate**: `max(hardware FLOPs / peak,
    estimated HBM bytes / HBM bandwidth, estimated collective time)` from the chip's
    published figures, where the collective time sums each mesh axis' bytes over the
    chip-to-chip links (ICI; NVLink within a GPU node), or the network for an axis whose
    groups span GPU nodes: perfect overlap, ideal kernels and links (a real step is
    slower); useful to rank meshes, not to promise a time.
    """

    topology: str
    chips: int
    chip: str
    mesh: dict[str, int]
    batch_size: int
    seq_len: int
    accum_steps: int
    remat_policy: str
    per_chip_bytes: dict[str, int] | None
    """`arguments` (params + moments + batch), `temporaries`, `outputs`, `aliased` (donated
    outputs reusing argument buffers), `total` = arguments + outputs - aliased + temporaries;
    None when not compiled."""
    hbm_bytes: int | None
    fits: bool | None
    """`total <= hbm_fraction * hbm_bytes`; None when not compiled or the HBM size is unknown."""
    hbm_fraction: float
    model_flops_per_step: float
    estimated_step_s: float
    estimated_mfu: float
    estimated_hbm_traffic_bytes: float
    estimated_collective_bytes: float
    estimated_total_bytes: float
    """Per-chip footprint from formulas (`estimated_footprint`), for ranking a search before compiling."""
    compile_s: float | None
    compiled: bool
    error: str | None = None
    hosts: int = 1
    """Hosts (processes) the devices belong to: GPU nodes, TPU VMs."""
    network_axes: tuple[str, ...] = ()
    """Mesh axes whose collectives cross GPU nodes (timed at the network bandwidth)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _per_chip_state_bytes(state) -> int:
    """Bytes one chip holds of an abstract sharded tree (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(state):
        if is_abstract(leaf):
            shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
            total += math.prod(shard) * leaf.dtype.itemsize
    return total


def _routed_ffn(model_config: ModelConfig) -> int:
    """The FFN width a token's top-k experts run (the dense MLP's in a dense model)."""
    return model_config.expert_ffn_dim if model_config.is_moe else model_config.ffn_dim


def _weight_counts(model_config: ModelConfig) -> tuple[int, int]:
    """(dense parameters, routed-expert parameters) of the model."""
    counts = count_parameters(model_config)
    return counts["total"] - counts["routed"], counts["routed"]


def estimated_collective_bytes(model_config: ModelConfig, train_config: TrainConfig,
                               mesh_sizes: Mapping[str, int]) -> float:
    """Estimated bytes one chip sends over the inter-chip links in one step (an estimate):
    the sum of `collective_bytes_by_axis`."""
    return sum(collective_bytes_by_axis(model_config, train_config, mesh_sizes).values())


def collective_bytes_by_axis(model_config: ModelConfig, train_config: TrainConfig,
                             mesh_sizes: Mapping[str, int]) -> dict[str, float]:
    """Estimated bytes one chip sends in one step along each mesh axis (an estimate).

    Terms, each `(n - 1) / n` of the data along an axis of size `n`: FSDP all-gathers of
    the weights a chip uses (compute dtype; forward, backward, and the remat forward)
    and reduce-scatters of their fp32 gradients, per micro-batch; the data axis'
    gradient all-reduce (twice the shard); the expert axis' two all-to-alls per MoE
    layer and pass (tokens x top-k x hidden, times the capacity factor); the tensor
    axis' two activation all-reduces per layer and pass.
    """
    c = jnp.dtype(model_config.compute_dtype).itemsize
    data, fsdp = mesh_sizes.get("data", 1), mesh_sizes.get("fsdp", 1)
    expert, tensor = mesh_sizes.get("expert", 1), mesh_sizes.get("tensor", 1)
    dense, routed = _weight_counts(model_config)
    used = (dense + routed / expert) / tensor
    passes = 3 if model_config.remat_policy == "full" else 2
    frac = lambda n: (n - 1) / n  # noqa: E731
    accum = train_config.accum_steps
    fsdp_bytes = accum * used * frac(fsdp) * (passes * c + 4)
    data_bytes = 2 * 4 * used / fsdp * frac(data)
    tokens = train_config.micro_batch_size * train_config.seq_len / max(data * fsdp * expert, 1)
    capacity = model_config.capacity_factor or 1.0
    a2a = accum * model_config.num_moe_layers * (2 * passes) * tokens * model_config.experts_per_token \
        * model_config.hidden_size * c * capacity * frac(expert)
    tp = accum * model_config.num_layers * (2 * passes) * 2 * tokens * model_config.hidden_size * c * frac(tensor)
    return {"data": data_bytes, "fsdp": fsdp_bytes, "expert": a2a, "tensor": tp}


def network_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes along which one group of devices spans several hosts (processes)."""
    hosts = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    crossing = []
    for i, axis in enumerate(mesh.axis_names):
        groups = np.moveaxis(hosts, i, -1).reshape(-1, hosts.shape[i])
        if (groups != groups[:, :1]).any():
            crossing.append(axis)
    return tuple(crossing)


def collective_seconds(by_axis: Mapping[str, float], chip: Chip, crossing: Sequence[str] = ()) -> float:
    """Estimated collective time: each axis' bytes over the chip-to-chip links, or over the
    network for `crossing` axes when the chip has a separate network (GPU nodes)."""
    seconds = 0.0
    for axis, nbytes in by_axis.items():
        bandwidth = chip.network_bandwidth if axis in crossing and chip.network_bandwidth else chip.ici_bandwidth
        seconds += nbytes / bandwidth if bandwidth else 0.0
    return seconds


def estimated_hbm_traffic(model_config: ModelConfig, train_config: TrainConfig, mesh_sizes: Mapping[str, int],
                          state_bytes_per_chip: int) -> float:
    """Estimated HBM bytes one chip reads and writes in one step (an estimate, see `Plan`).

    Terms: the AdamW update reads parameters, gradients and both moments and writes
    parameters and moments (7 passes over the fp32 state shard: `7/3 * state bytes`);
    the weights a chip multiplies with (dense weights gathered whole, its `1/expert`
    of the experts, `1/tensor` of both) are read in the compute dtype in the forward,
    the remat forward and the two backward matmuls; activations: per token and layer
    about `12 * hidden + 3 * ffn * top_k` values written and read back three times.
    """
    compute_bytes = jnp.dtype(model_config.compute_dtype).itemsize
    dense, routed = _weight_counts(model_config)
    expert, tensor = mesh_sizes.get("expert", 1), mesh_sizes.get("tensor", 1)
    weights = (dense + routed / expert) / tensor
    passes = 4 if model_config.remat_policy == "full" else 3
    chips = math.prod(mesh_sizes.values())
    tokens_per_chip = train_config.batch_size * train_config.seq_len / max(chips // tensor, 1)
    per_token = 12 * model_config.hidden_size + 3 * _routed_ffn(model_config) * model_config.experts_per_token
    activations = tokens_per_chip * model_config.num_layers * per_token * compute_bytes * 3 / tensor
    return 7.0 / 3.0 * state_bytes_per_chip + weights * compute_bytes * passes * train_config.accum_steps \
        + activations


def estimated_footprint(model_config: ModelConfig, train_config: TrainConfig, mesh_sizes: Mapping[str, int],
                        state_bytes_per_chip: int) -> float:
    """Per-chip bytes from formulas (an estimate; the compile gives the real figure): the
    state (parameters and moments), fp32 gradients (a third of it), activations saved for
    the backward by the remat policy, plus one layer's working set and one logits chunk."""
    h, f, k = model_config.hidden_size, _routed_ffn(model_config), model_config.experts_per_token
    compute_bytes = jnp.dtype(model_config.compute_dtype).itemsize
    chips = math.prod(mesh_sizes.values())
    tensor = mesh_sizes.get("tensor", 1)
    tokens = train_config.micro_batch_size * train_config.seq_len / max(chips // tensor, 1)
    saved = REMAT[model_config.remat_policy].saved_values(h, f, k)
    activations = tokens * model_config.num_layers * saved * compute_bytes / tensor
    working = tokens * (16 * h + 5 * f * k) * 4 / tensor
    chunk = min(train_config.loss_chunk_size or train_config.seq_len, train_config.seq_len)
    logits = tokens / train_config.seq_len * chunk * model_config.vocab_size * 4 * 3 / tensor
    return state_bytes_per_chip * 4 / 3 + activations + working + logits


def plan(
    model_config: ModelConfig,
    train_config: TrainConfig,
    topology: str,
    mesh_sizes: Mapping[str, int] | None = None,
    *,
    compile: bool = True,
    hbm_fraction: float = 0.8,
    rules: Sequence[Rule] = DEFAULT_RULES,
    devices: Sequence[jax.Device] | None = None,
    hlo_path: str | os.PathLike | None = None,
) -> Plan:
    """Compile (unless `compile=False`) the whole train step for `topology` and estimate its speed.

    Arguments:
        topology: a TPU topology (`v5p:4x4x4`) or GPU one (`h100:64`); its abstract
            devices come from `topology_devices` unless `devices` is given (e.g. CPU
            devices for a test, or GPUs of another target description).
        mesh_sizes: axis sizes (`fsdp`, `expert`, `data`, `tensor`; one may be -1);
            default all chips on `fsdp`.
        hbm_fraction: `fits` means a per-chip total at most this fraction of HBM.
        hlo_path: write the compiled program's text (`compiled.as_text()`) to this file.
    """
    devices = list(topology_devices(topology) if devices is None else devices)
    sizes = resolve_axis_sizes(dict(mesh_sizes or {"fsdp": -1}), len(devices))
    mesh = make_mesh(sizes, devices=devices)
    _check_divisible(model_config, train_config, sizes)
    chip = chip_of(devices[0])
    state = abstract_train_state(model_config, train_config, mesh, rules)
    state_bytes = _per_chip_state_bytes(state)
    flops = model_flops_per_token(model_config, train_config.seq_len) * train_config.batch_size \
        * train_config.seq_len
    hardware_flops = flops * REMAT[model_config.remat_policy].recompute
    traffic = estimated_hbm_traffic(model_config, train_config, sizes, state_bytes)
    by_axis = collective_bytes_by_axis(model_config, train_config, sizes)
    collective = sum(by_axis.values())
    crossing = network_axes(mesh) if chip is not None and chip.network_bandwidth else ()
    if chip is not None:
        step_s = max(hardware_flops / (len(devices) * chip.bf16_flops),
                     traffic / chip.hbm_bandwidth if chip.hbm_bandwidth else 0.0,
                     collective_seconds(by_axis, chip, crossing))
        mfu = flops / (len(devices) * chip.bf16_flops * step_s)
    else:
        step_s, mfu = float("nan"), float("nan")
    per_chip, fits, seconds, error = None, None, None, None
    if compile:
        try:
            compiled, seconds = compile_train_step(model_config, train_config, mesh, rules)
            if hlo_path is not None:
                atomic_write_text(hlo_path, compiled.as_text())
            stats = memory_stats(compiled)
            per_chip = {"arguments": stats["argument_size_in_bytes"], "temporaries": stats["temp_size_in_bytes"],
                        "outputs": stats["output_size_in_bytes"], "aliased": stats["alias_size_in_bytes"],
                        "total": stats["total_size_in_bytes"]}
            if chip is not None and chip.hbm_bytes:
                fits = per_chip["total"] <= hbm_fraction * chip.hbm_bytes
        except Exception as exc:  # a compile that runs out of memory or hits a compiler limit is a result
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            error = f"{type(exc).__name__}: {first[:300]}"
            fits = False
    return Plan(topology=topology, chips=len(devices), chip=chip.name if chip else devices[0].device_kind,
                mesh={axis: sizes[axis] for axis in AXES}, batch_size=train_config.batch_size,
                seq_len=train_config.seq_len, accum_steps=train_config.accum_steps,
                remat_policy=model_config.remat_policy, per_chip_bytes=per_chip,
                hbm_bytes=None if chip is None else chip.hbm_bytes, fits=fits, hbm_fraction=hbm_fraction,
                model_flops_per_step=flops, estimated_step_s=step_s, estimated_mfu=mfu,
                estimated_hbm_traffic_bytes=traffic, estimated_collective_bytes=collective,
                estimated_total_bytes=estimated_footprint(model_config, train_config, sizes, state_bytes),
                compile_s=seconds, compiled=per_chip is not None,
                error=error, hosts=len({d.process_index for d in devices}), network_axes=crossing)


def _check_divisible(model_config: ModelConfig, train_config: TrainConfig, sizes: Mapping[str, int]) -> None:
    shown = ",".join(f"{axis}={size}" for axis, size in sizes.items() if size > 1) or "one chip"
    shards = batch_shards(sizes)
    if train_config.micro_batch_size % shards:
        raise InvalidValueError(f"mesh {shown}: the micro-batch of {train_config.micro_batch_size} rows (batch "
                                f"{train_config.batch_size} / accum {train_config.accum_steps}) does not split over "
                                f"data*fsdp*expert = {shards} chips; use a batch that is a multiple of "
                                f"{shards * train_config.accum_steps}.")
    if model_config.is_moe and model_config.num_experts % sizes["expert"]:
        raise InvalidValueError(f"mesh {shown}: expert={sizes['expert']} does not divide num_experts="
                                f"{model_config.num_experts}; use an expert size that divides it.")


def candidate_meshes(chips: int, model_config: ModelConfig, *, max_tensor: int = 8) -> list[dict[str, int]]:
    """Meshes `fsdp x expert x data x tensor` over `chips`: expert divides the experts,
    tensor (at most `max_tensor`) divides the kv heads, fsdp takes the rest with data."""
    def divisors(n):
        return [d for d in range(1, n + 1) if n % d == 0]

    experts = divisors(model_config.num_experts) if model_config.is_moe else [1]
    meshes = []
    for expert, tensor in itertools.product(experts, divisors(min(max_tensor, chips))):
        if chips % (expert * tensor) or model_config.kv_heads % tensor:
            continue
        rest = chips // (expert * tensor)
        for data in divisors(rest):
            meshes.append({"data": data, "fsdp": rest // data, "expert": expert, "tensor": tensor})
    return meshes


def search_plans(
    model_config: ModelConfig,
    train_config: TrainConfig,
    topology: str,
    *,
    remat_policies: Sequence[str] = ("full", "dots_saveable"),
    accum_steps: Sequence[int] = (1, 2, 4),
    compile_top: int = 3,
    max_data: int = 2,
    hbm_fraction: float = 0.8,
    progress: Callable[[str], None] | None = None,
    devices: Sequence[jax.Device] | None = None,
    hlo_dir: str | os.PathLike | None = None,
) -> list[Plan]:
    """Try meshes, remat policies and micro-batch sizes; compile the `compile_top`
    fastest by the estimate among those whose `estimated_total_bytes` fits (the rest
    keep their estimates, `compiled=False`).

    Meshes with more than `max_data` pure data-parallel replicas are left out (each
    replica holds a whole copy of the sharded state). Returns plans sorted by
    estimated step time, compiled ones that fit first. With `hlo_dir`, each compiled
    program's text goes to `hlo_dir/<mesh>_<remat>_accum<N>.hlo.txt`.
    """
    devices = list(topology_devices(topology) if devices is None else devices)
    candidates = []
    for mesh_sizes in candidate_meshes(len(devices), model_config):
        if mesh_sizes["data"] > max_data:
            continue
        for policy, accum in itertools.product(remat_policies, accum_steps):
            tc = train_config.replace(accum_steps=accum)
            shards = mesh_sizes["data"] * mesh_sizes["fsdp"] * mesh_sizes["expert"]
            if tc.batch_size % accum or tc.micro_batch_size % shards:
                continue
            candidates.append((model_config.replace(remat_policy=policy), tc, mesh_sizes))
    estimates = [plan(mc, tc, topology, sizes, compile=False, hbm_fraction=hbm_fraction, devices=devices)
                 for mc, tc, sizes in candidates]
    # Fastest first among those the formulas expect to fit; the compile then decides.
    budget = (estimates[0].hbm_bytes or float("inf")) * hbm_fraction if estimates else 0.0
    # Ties (compute-bound estimates) go to the mesh that moves fewer bytes between chips.
    order = sorted(range(len(candidates)),
                   key=lambda i: (estimates[i].estimated_total_bytes > budget, estimates[i].estimated_step_s,
                                  estimates[i].estimated_collective_bytes))
    results = list(estimates)
    for rank, i in enumerate(order[:compile_top]):
        mc, tc, sizes = candidates[i]
        if progress is not None:
            progress(f"compiling {rank + 1}/{min(compile_top, len(order))}: mesh {_mesh_text(sizes)}, remat "
                     f"{mc.remat_policy}, accum {tc.accum_steps}")
        hlo_path = None
        if hlo_dir is not None:
            os.makedirs(hlo_dir, exist_ok=True)
            mesh_name = _mesh_text(sizes).replace("=", "").replace(",", "_").replace(" ", "")
            name = f"{mesh_name}_{mc.remat_policy}_accum{tc.accum_steps}"
            hlo_path = os.path.join(hlo_dir, f"{name}.hlo.txt")
        results[i] = plan(mc, tc, topology, sizes, compile=True, hbm_fraction=hbm_fraction, devices=devices,
                          hlo_path=hlo_path)
    return sorted(results, key=lambda p: (not p.compiled, p.fits is False, p.estimated_step_s,
                                          p.estimated_collective_bytes))


def _mesh_text(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in sizes.items() if size > 1) or "1 chip"
