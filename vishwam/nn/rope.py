"""Rotary position embeddings (rotate-half convention, as in Llama/Mixtral checkpoints), with
the long-context frequency scalings of transformers' `modeling_rope_utils`: `linear`,
`dynamic` (NTK), `llama3` and `yarn` (whose attention factor scales cos and sin)."""

import dataclasses
import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ..config import ModelConfig
from ..errors import InvalidValueError

SCALINGS = ("linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are stretched past the context a model was trained on
    (the `ModelConfig.rope_*` fields; transformers' `rope_parameters`)."""

    kind: str
    """`linear` (positions / factor), `dynamic` (NTK: the base grows with the longest position
    of the call past `original_max_seq_len`), `llama3` (low frequencies / factor, high ones
    kept, a smooth ramp between) or `yarn` (per-frequency blend of interpolation and
    extrapolation, cos and sin times `attention_factor`)."""
    factor: float
    """The context extension factor."""
    original_max_seq_len: int
    """The context the model was pretrained on (`dynamic`, `llama3`, `yarn`)."""
    low_freq_factor: float = 1.0
    """`llama3`: wavelengths above `original_max_seq_len / low_freq_factor` are divided by `factor`."""
    high_freq_factor: float = 4.0
    """`llama3`: wavelengths below `original_max_seq_len / high_freq_factor` are kept."""
    beta_fast: float = 32.0
    """`yarn`: the rotation count where extrapolation stops (the ramp's low end)."""
    beta_slow: float = 1.0
    """`yarn`: the rotation count where interpolation starts (the ramp's high end)."""
    attention_factor: float | None = None
    """`yarn`: the factor on cos and sin; `None` means `0.1 * ln(factor) + 1`."""
    truncate: bool = True
    """`yarn`: round the ramp's ends to whole dimensions (transformers' default)."""

    def __post_init__(self):
        if self.kind not in SCALINGS:
            raise InvalidValueError(f"RopeScaling.kind: unknown {self.kind!r}; choose one of {SCALINGS}.")
        if not self.factor > 0 or self.original_max_seq_len <= 0:
            raise InvalidValueError(f"RopeScaling: factor={self.factor} and original_max_seq_len="
                                    f"{self.original_max_seq_len} must be > 0.")

    @property
    def cos_sin_factor(self) -> float:
        """The factor on cos and sin (so on each of q and k): 1 but for `yarn`."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


def rope_scaling_of(config: ModelConfig) -> RopeScaling | None:
    """The `RopeScaling` of a config's `rope_*` fields (`None` for plain RoPE)."""
    if config.rope_scaling == "none":
        return None
    original = config.max_seq_len if config.rope_original_max_seq_len is None else config.rope_original_max_seq_len
    return RopeScaling(config.rope_scaling, config.rope_factor, original, config.rope_low_freq_factor,
                       config.rope_high_freq_factor, config.rope_beta_fast, config.rope_beta_slow,
                       config.rope_attention_factor, config.rope_truncate)


def _inverse_frequencies(head_dim: int, theta) -> Float[Array, " half"]:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
    positions: Int[Array, "..."] | None = None,
) -> Float[Array, " half"]:
    """The `head_dim / 2` inverse frequencies `theta^(-2i/d)`, scaled by `scaling`.

    `dynamic` depends on the call: its sequence length is `max(positions) + 1` (at least
    `original_max_seq_len`), as in transformers for a model that has not yet seen a longer one.
    """
    if scaling is None:
        return _inverse_frequencies(head_dim, theta)
    factor = scaling.factor
    if scaling.kind == "linear":
        return _inverse_frequencies(head_dim, theta) / factor
    if scaling.kind == "dynamic":
        if positions is None:
            raise InvalidValueError("rope_frequencies: dynamic scaling needs the positions of the call.")
        original = scaling.original_max_seq_len
        seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, original)
        base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _inverse_frequencies(head_dim, base)
    if scaling.kind == "llama3":
        inv_freq = _inverse_frequencies(head_dim, theta)
        old = scaling.original_max_seq_len
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return jnp.where(medium, smoothed, scaled)
    # yarn
    pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def correction_dim(rotations):
        return (head_dim * math.log(scaling.original_max_seq_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # the share of extrapolation (the unscaled frequency)
    return interpolation * (1 - keep) + extrapolation * keep


def apply_rope(
    x: Float[Array, "batch seq heads head_dim"],
    positions: Int[Array, "batch seq"],
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
    """Rotate pairs `(x[i], x[i + d/2])` by angle `position * freq_i`, `freq_i = theta^(-2i/d)`
    as `scaling` changes it (see `rope_frequencies`; yarn also multiplies the result by
    its attention factor).

    Angles are computed in fp32 from the integer positions, so packed documents
    (positions restarting at each document) and KV-cache offsets need no tables.
    """
    head_dim = x.shape[-1]
    freqs = rope_frequencies(head_dim, theta, scaling, positions)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # (B, T, d/2)
    cos = jnp.cos(angles)[:, :, None, :]  # (B, T, 1, d/2)
    sin = jnp.sin(angles)[:, :, None, :]
    if scaling is not None and scaling.cos_sin_factor != 1.0:
        cos, sin = cos * scaling.cos_sin_factor, sin * scaling.cos_sin_factor
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
