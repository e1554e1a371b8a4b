"""Model FLOPs and the accelerators' published peaks: what MFU and the planner's roofline divide by.

`model_flops_per_token` is PaLM's training estimate (forward + backward, no remat);
`CHIPS` lists vendors' per-chip figures (never measured here); `estimate_peak_flops`
gives the peak of a set of devices (a matmul timed here for CPUs).
"""

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from .params import count_parameters


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's estimate: `6 N + 12 L H Q T`.

    `N` counts the parameters a token uses (top-k experts only, LM head included,
    embedding lookup excluded; a tied embedding counts once, as the head),
    `L` layers, `H` heads of width `Q`, `T` the sequence length (attention over
    the full, not the causal half, square as in PaLM). Multi-head latent attention's
    query/key and value heads differ in width: `12 Q` is `6 (qk_head_dim + v_head_dim)`
    there (the scores and the weighted sum of the expanded heads, as trained).
    Recomputation (remat) is not counted: this is the "model FLOPs" of MFU.
    """
    active = count_parameters(config)["active"]
    lookup = 0 if config.tie_embeddings else config.vocab_size * config.hidden_size
    head_widths = config.qk_head_dim + config.value_head_dim  # 2 Q for multi-head / grouped-query attention
    attention = 6 * config.num_layers * config.num_heads * head_widths * seq_len
    return 6.0 * (active - lookup) + attention


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures of an accelerator (vendor data sheets, not measured here)."""

    name: str
    bf16_flops: float
    """Dense bf16 peak FLOP/s."""
    hbm_bytes: int | None = None
    """Device memory (HBM) per chip."""
    hbm_bandwidth: float | None = None
    """HBM bytes/s per chip."""
    ici_bandwidth: float | None = None
    """Bidirectional inter-chip bytes/s per chip (all links together): TPU ICI, GPU NVLink
    (within a node)."""
    network_bandwidth: float | None = None
    """Bidirectional bytes/s per chip between nodes (GPUs: the node's InfiniBand NICs
    divided by its GPUs); None where the chip-to-chip links span the whole slice (TPU)."""


# Matched (case-insensitively) as substrings of `device_kind`, first match wins, so
# the more specific names come first. TPU figures: Google Cloud TPU system
# architecture pages (v4, v5e, v5p, v6e); GPU figures: NVIDIA data sheets (dense,
# without sparsity): H100 SXM and H200 SXM product pages (989 TFLOP/s bf16 dense = half
# the 1,979 with sparsity; NVLink 4 900 GB/s), HGX B200 (36 PFLOP/s fp16 sparse over 8
# GPUs = 2.25 dense per GPU; NVLink 5 1.8 TB/s; 180 GB and 7.7 TB/s of HBM3e per GPU),
# A100 SXM (312 TFLOP/s, NVLink 3 600 GB/s). Between nodes: the DGX H100, H200 and B200
# user guides' eight ConnectX-7 400 Gb/s NICs per 8-GPU node (50 GB/s each way per GPU,
# 100 GB/s both ways), DGX A100's eight 200 Gb/s HDR NICs (50 GB/s both ways per GPU).
CHIPS: tuple[Chip, ...] = (
    Chip("H200", 989e12, 141 * 10**9, 4.8e12, 900e9, 100e9),
    Chip("H100", 989e12, 80 * 10**9, 3.35e12, 900e9, 100e9),
    Chip("B200", 2250e12, 180 * 10**9, 7.7e12, 1800e9, 100e9),
    Chip("A100", 312e12, 80 * 10**9, 2.0e12, 600e9, 50e9),
    Chip("L40S", 362e12, 48 * 10**9, 0.864e12),
    Chip("L4", 121e12, 24 * 10**9, 0.3e12),
    Chip("A10", 125e12, 24 * 10**9, 0.6e12),
    Chip("V100", 125e12, 32 * 10**9, 0.9e12),
    Chip("TPU v6 lite", 918e12, 32 * 10**9, 1638e9, 800e9),  # v6e (Trillium)
    Chip("TPU v6", 918e12, 32 * 10**9, 1638e9, 800e9),
    Chip("TPU v5 lite", 197e12, 16 * 10**9, 819e9, 400e9),  # v5e
    Chip("TPU v5p", 459e12, 95 * 10**9, 2765e9, 1200e9),
    Chip("TPU v5", 459e12, 95 * 10**9, 2765e9, 1200e9),  # libtpu names v5p chips "TPU v5"
    Chip("TPU v4", 275e12, 32 * 2**30, 1228e9),
    Chip("TPU v3", 123e12, 32 * 2**30, 900e9),
)


def chip_of(device: jax.Device) -> Chip | None:
    """The `CHIPS` entry of `device.device_kind`, or None (CPUs, unknown kinds)."""
    kind = device.device_kind.lower()
    for chip in CHIPS:
        if chip.name.lower() in kind:
            return chip
    return None


def estimate_peak_flops(devices: Sequence[jax.Device]) -> tuple[float, str]:
    """Peak FLOP/s of `devices` together and how it was obtained.

    Accelerators: the vendor bf16 dense figure of their `device_kind` (`CHIPS`). CPU
    (and unknown kinds): a 1024^3 fp32 matmul timed here, for the whole process (CPU
    "devices" share the same cores), so CPU MFU reads as a fraction of what this
    machine's matmul reaches now.
    """
    chip = chip_of(devices[0])
    if chip is not None:
        return chip.bf16_flops * len(devices), f"{len(devices)} x {chip.name} bf16 peak"
    n = 1024
    a = jax.device_put(jnp.ones((n, n), jnp.float32), devices[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    repeats, start = 4, time.perf_counter()
    for _ in range(repeats):
        out = matmul(a)
    out.block_until_ready()
    seconds = time.perf_counter() - start
    return 2.0 * n**3 * repeats / seconds, f"measured {n}^3 fp32 matmul on {devices[0].device_kind}"
