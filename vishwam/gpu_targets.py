"""Abstract NVIDIA GPUs to compile for on a machine without one.

`gpu_devices("h100:64")` returns 64 abstract `NVIDIA H100 80GB HBM3` devices, 8 per host
(8 hosts); `jax.jit(f).lower(...).compile()` over a mesh of them runs the real XLA GPU
compiler (Triton for the Pallas kernels, cuBLAS/Triton GEMMs, the GPU collectives) on this
CPU. It needs the CUDA PJRT plugin, not a GPU: `pip install "vishwam[gpu-aot]"`.

Topologies: `NAME:N` (N GPUs; more than 8 in whole hosts of 8) or `NAME:HOSTSxPER_HOST`
(`h100:8x8`). Each `NAME` in `GPUS` has a target description shipped with the package
(`vishwam/gpu_specs/NAME.txtpb`, a `GpuTargetConfigProto` from XLA's published specs);
`target_config=` takes another one's text (any `NAME` then).

`pallas_calls(hlo_text, names)` reads a compiled program's text (`compiled.as_text()`) for
what its Pallas kernels became: Triton custom calls, or ordinary ops (interpret mode);
`dot_operand_types(hlo_text)` for the element types its GEMMs multiply (fp8 kept or not).
"""

import importlib.resources
import importlib.util
import re
from collections.abc import Sequence

import jax

from .errors import InvalidValueError

GPUS_PER_HOST = 8
"""GPUs per host of an `NAME:N` topology (an HGX/DGX node)."""

GPUS = ("h100", "h200", "b200", "a100")
"""The GPUs whose target description ships with the package (`gpu_specs/NAME.txtpb`)."""

_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def is_gpu_topology(topology: str) -> bool:
    """Whether `topology` names GPUs (`h100:64`) rather than a TPU slice (`v5p:4x4x4`)."""
    return topology.partition(":")[0].lower() in GPUS


def parse_gpu_topology(topology: str) -> tuple[str, int, int]:
    """`(name, hosts, gpus per host)` of `NAME:N` or `NAME:HOSTSxPER_HOST`."""
    name, sep, shape = topology.partition(":")
    dims = shape.split("x") if sep else []
    if not name or len(dims) not in (1, 2) or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise InvalidValueError(f"topology {topology!r}: expected GPU:N or GPU:HOSTSxGPUS_PER_HOST such as h100:64 "
                                "or h100:8x8 (GPU one of " + ", ".join(GPUS) + ").")
    if len(dims) == 2:
        return name.lower(), int(dims[0]), int(dims[1])
    count = int(dims[0])
    if count <= GPUS_PER_HOST:
        return name.lower(), 1, count
    if count % GPUS_PER_HOST:
        raise InvalidValueError(f"topology {topology!r}: {count} GPUs are not whole hosts of {GPUS_PER_HOST}; use a "
                                f"multiple of {GPUS_PER_HOST} or spell the hosts out (e.g. {name}:2x6).")
    return name.lower(), count // GPUS_PER_HOST, GPUS_PER_HOST


def gpu_target_config(name: str) -> str:
    """The shipped target description (`GpuTargetConfigProto` text) of GPU `name`."""
    if name.lower() not in GPUS:
        raise InvalidValueError(f"no target description ships for GPU {name!r}; use one of {', '.join(GPUS)} or pass "
                                "your own (--gpu-spec FILE, a GpuTargetConfigProto as in XLA's "
                                "xla/backends/gpu/target_config/specs/).")
    return importlib.resources.files("vishwam").joinpath("gpu_specs", f"{name.lower()}.txtpb").read_text()


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (what compiles for GPUs, with or without one) is installed."""
    return any(importlib.util.find_spec(name) is not None for name in _PLUGINS)


def gpu_devices(topology: str, target_config: str | None = None) -> list[jax.Device]:
    """The abstract GPUs of `topology` (see the module docstring), host by host.

    Arguments:
        topology: `h100:64`, `h200:16`, `b200:8x8`, ...
        target_config: a `GpuTargetConfigProto` in text form; default the shipped one of
            the topology's GPU.

    Devices of one host share a `process_index`. Set `JAX_PLATFORMS=cpu` (or any list
    without `cuda`) before JAX starts on a machine without a GPU: otherwise the plugin
    prints a traceback when it fails to find one.
    """
    name, hosts, per_host = parse_gpu_topology(topology)
    text = gpu_target_config(name) if target_config is None else target_config
    if not cuda_plugin_installed():
        raise RuntimeError("compiling for NVIDIA GPUs needs JAX's CUDA plugin (no GPU needed): pip install "
                           "\"vishwam[gpu-aot]\"")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc("", "cuda", target_config=text, topology=f"1x{hosts}x{per_host}")
    except Exception as error:  # the plugin raises JaxRuntimeError with its own text
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InvalidValueError(f"topology {topology!r}: the CUDA plugin refused it ({first}); check the target "
                                "description (a GpuTargetConfigProto this jaxlib parses).") from None
    return list(desc.devices)


TRITON_CALL = "__gpu$xla.gpu.triton"
"""The custom-call target of a Pallas kernel lowered through Triton in XLA:GPU's program."""


def pallas_calls(hlo_text: str, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """How each named Pallas kernel (`pallas_call(..., name=NAME)`) appears in a compiled
    program's text: `{"triton": custom calls running it, "interpreted": ordinary ops traced
    from it}`. A kernel compiled for the GPU is one Triton custom call per use and no
    ordinary ops (those ops mean `interpret=True`: the kernel body unrolled into XLA ops)."""
    counts = {name: {"triton": 0, "interpreted": 0} for name in names}
    for line in hlo_text.splitlines():
        match = re.search(r'op_name="([^"]*)"', line)
        if match is None:
            continue
        op_name = match.group(1)
        for name in names:
            # The kernel's scope, maybe inside transformations: `jvp(NAME)/pallas_call`.
            if re.search(rf"\b{re.escape(name)}\)*/pallas_call", op_name):
                counts[name]["triton"] += f'custom_call_target="{TRITON_CALL}"' in line
            elif re.search(rf"\b{re.escape(name)}\b", op_name):
                counts[name]["interpreted"] += 1
    return counts


def dot_operand_types(hlo_text: str) -> list[tuple[str, ...]]:
    """The element types of every `dot`'s operands in a compiled program's text, e.g.
    `("f8e4m3fn", "f8e4m3fn")` for an fp8 GEMM that kept its fp8 operands."""
    types = dict(re.findall(r"%([\w.-]+) = (\w+)\[", hlo_text))
    types.update(re.findall(r"([\w.-]+): (\w+)\[", hlo_text))  # fusion computations' parameters
    return [tuple(types.get(name, "?") for name in re.findall(r"%([\w.-]+)", operands))
            for operands in re.findall(r" dot\(([^)]*)\)", hlo_text)]
