"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with its compressed KV cache.

Per token, with `H` heads, a kv latent of width `C` (`kv_lora_rank`), per-head widths `n`
(`qk_nope_head_dim`), `r` (`qk_rope_head_dim`) and `v` (`v_head_dim`):

    q        = q_b(RMSNorm(q_a(x)))  (or q_proj(x) without a q rank)   [H, n + r]
    latent   = RMSNorm(kv_a(x)[:C])                                    [C]
    k_rope   = RoPE(kv_a(x)[C:])        one rotary key for all heads   [r]
    k_nope,v = kv_b(latent)                                            [H, n], [H, v]
    k        = [k_nope, k_rope],  q = [q_nope, RoPE(q_rope)]

Training runs `flash_attention` on the expanded heads. Its kernels take one width for q, k
and v, so the narrower side is padded with zeros (the values to `n + r` for DeepSeek: zero
query/key columns add nothing to the scores, zero value columns are cut from the output).

Decoding caches per token and layer only `[latent, k_rope]` (`C + r` values: 576 for
DeepSeek-V3, against `2 H (n + r)` = 49152 for the expanded keys and values) and attends in
the latent space (the "absorbed" form): the query's no-RoPE part is folded through
`kv_b`'s key half, `q_lat = q_nope W_UK^T` `[H, C]`, so that `q_lat . latent + q_rope . k_rope`
is the score of the expanded head; the softmax-weighted latents are unfolded through the
value half, `out = (p . latent) W_UV`. That is one-kv-head attention over the cache
(`vishwam.nn.attention.cached_attention`), with the latent also serving as the values.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..errors import InvalidValueError
from ..kernels import flash_attention
from .attention import cached_attention, default_positions, project_heads
from .linear import Linear
from .norm import RMSNorm
from .rope import RopeScaling, apply_rope


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's yarn magnitude `0.1 * mscale * ln(factor) + 1` (1 for `factor <= 1`)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def mla_softmax_scale(qk_head_dim: int, scaling: RopeScaling | None, mscale_all_dim: float = 0.0) -> float:
    """`1 / sqrt(qk_head_dim)`, times `yarn_mscale(factor, mscale_all_dim) ** 2` under yarn
    scaling with a nonzero `mscale_all_dim` (DeepSeek-V3; transformers' `yarn_apply_mscale`)."""
    scale = qk_head_dim ** -0.5
    if scaling is not None and scaling.kind == "yarn" and mscale_all_dim:
        scale *= yarn_mscale(scaling.factor, mscale_all_dim) ** 2
    return scale


def deinterleave(x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
    """`(x0, x1, x2, x3, ...)` -> `(x0, x2, ..., x1, x3, ...)`: interleaved rotary pairs laid
    out as halves, so that `apply_rope` (rotate-half) rotates the pairs DeepSeek rotates."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class MultiHeadLatentAttention(eqx.Module):
    """DeepSeek's multi-head latent attention (see the module docstring for the maths).

    Leaves (weights `[in, out]`): `q_proj` `[D, H (n + r)]` when `q_lora_rank` is None, else
    `q_a_proj` `[D, q_rank]`, `q_a_norm`, `q_b_proj` `[q_rank, H (n + r)]`; `kv_a_proj`
    `[D, C + r]`, `kv_a_norm` `[C]`, `kv_b_proj` `[C, H (n + v)]` (per head: its `n` key
    columns, then its `v` value columns); `o_proj` `[H v, D]`.
    """

    q_proj: Linear | None
    q_a_proj: Linear | None
    q_a_norm: RMSNorm | None
    q_b_proj: Linear | None
    kv_a_proj: Linear
    kv_a_norm: RMSNorm
    kv_b_proj: Linear
    o_proj: Linear
    num_heads: int = eqx.field(static=True)
    kv_lora_rank: int = eqx.field(static=True)
    qk_nope_head_dim: int = eqx.field(static=True)
    qk_rope_head_dim: int = eqx.field(static=True)
    v_head_dim: int = eqx.field(static=True)
    softmax_scale: float = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)
    rope_scaling: RopeScaling | None = eqx.field(static=True)
    rope_interleave: bool = eqx.field(static=True)
    use_flash_attn: bool = eqx.field(static=True)
    implementation: str = eqx.field(static=True)
    block_size: int = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        softmax_scale: float | None = None,
        use_flash_attn: bool = True,
        use_fp8: bool = False,
        sliding_window: int | None = None,
        rope_theta: float = 10000.0,
        rope_scaling: RopeScaling | None = None,
        rope_interleave: bool = False,
        norm_eps: float = 1e-6,
        implementation: str = "auto",
        block_size: int = 128,
        fp8_scaling: str = "tensor",
        fp8_block_size: int = 128,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        kq, kqb, kkv, kkvb, ko = jax.random.split(key, 5)
        common = dict(use_bias=False, use_fp8=use_fp8, block_size=fp8_block_size, fp8_scaling=fp8_scaling,
                      dtype=dtype)
        qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = Linear(hidden_size, num_heads * qk, init_std=init_std, key=kq, **common)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(hidden_size, q_lora_rank, init_std=init_std, key=kq, **common)
            self.q_a_norm = RMSNorm(q_lora_rank, norm_eps, dtype=dtype)
            self.q_b_proj = Linear(q_lora_rank, num_heads * qk, init_std=init_std, key=kqb, **common)
        self.kv_a_proj = Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, init_std=init_std, key=kkv, **common)
        self.kv_a_norm = RMSNorm(kv_lora_rank, norm_eps, dtype=dtype)
        self.kv_b_proj = Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), init_std=init_std,
                                key=kkvb, **common)
        self.o_proj = Linear(num_heads * v_head_dim, hidden_size,
                             init_std=init_std if out_init_std is None else out_init_std, key=ko, **common)
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.softmax_scale = qk ** -0.5 if softmax_scale is None else float(softmax_scale)
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.rope_interleave = rope_interleave
        self.use_flash_attn = use_flash_attn
        self.implementation = implementation
        self.block_size = block_size
        self.sliding_window = sliding_window

    def __check_init__(self):
        if self.qk_rope_head_dim % 2:
            raise InvalidValueError(f"MultiHeadLatentAttention: qk_rope_head_dim={self.qk_rope_head_dim} must be "
                                    "even (rotary pairs).")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer: the latent and the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ------------------------------------------------------------ projections
    def _rope(self, x, positions):
        if self.rope_interleave:
            x = deinterleave(x)
        return apply_rope(x, positions, theta=self.rope_theta, scaling=self.rope_scaling)

    def queries(
        self, x: Float[Array, "batch seq hidden"], positions: Int[Array, "batch seq"]
    ) -> tuple[Float[Array, "batch seq heads nope"], Float[Array, "batch seq heads rope"]]:
        """Each head's query without RoPE and its rotated part."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.reshape(b, t, self.num_heads, self.qk_head_dim)  # (B, T, H, n + r)
        q_nope, q_rope = q[..., :self.qk_nope_head_dim], q[..., self.qk_nope_head_dim:]
        return q_nope, self._rope(q_rope, positions)

    def latents(
        self, x: Float[Array, "batch seq hidden"], positions: Int[Array, "batch seq"]
    ) -> tuple[Float[Array, "batch seq rank"], Float[Array, "batch seq rope"]]:
        """What the cache holds per token: the normalised kv latent and the rotated shared key."""
        kv = self.kv_a_proj(x)  # (B, T, C + r)
        latent = self.kv_a_norm(kv[..., :self.kv_lora_rank])
        k_rope = self._rope(kv[..., None, self.kv_lora_rank:], positions)[:, :, 0]  # one "head": (B, T, r)
        return latent, k_rope

    def _up_weights(self, dtype):
        """`kv_b`'s key and value halves per head: `[C, H, n]`, `[C, H, v]`."""
        w = self.kv_b_proj.weight.astype(dtype).reshape(self.kv_lora_rank, self.num_heads,
                                                        self.qk_nope_head_dim + self.v_head_dim)
        return w[..., :self.qk_nope_head_dim], w[..., self.qk_nope_head_dim:]

    # ------------------------------------------------------------------ calls
    def __call__(
        self,
        x: Float[Array, "batch seq hidden"],
        *,
        positions: Int[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        mask: Bool[Array, "..."] | None = None,
        causal: bool = True,
    ) -> Float[Array, "batch seq hidden"]:
        """Attention over the sequence itself (training, scoring), on the expanded heads;
        arguments as `TPUMultiHeadAttention.__call__`."""
        with jax.named_scope("attention"):
            if positions is None:
                positions = default_positions(segment_ids, x.shape[:2])
            b, t, _ = x.shape
            h, n, r, v_dim = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
            q_nope, q_rope = self.queries(x, positions)
            latent, k_rope = self.latents(x, positions)
            kv = self.kv_b_proj(latent).reshape(b, t, h, n + v_dim)  # (B, T, H, n + v)
            k_nope, v = kv[..., :n], kv[..., n:]
            q = jnp.concatenate([q_nope, q_rope], axis=-1)  # (B, T, H, n + r)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (b, t, h, r))], axis=-1)
            # One width for the kernels: zero columns change neither the scores nor the kept outputs.
            width = max(n + r, v_dim)

            def pad(a):
                return jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, width - a.shape[-1])))

            impl = self.implementation if self.use_flash_attn else "reference"
            out = flash_attention(pad(q), pad(k), pad(v), mask=mask, causal=causal, segment_ids=segment_ids,
                                  window=self.sliding_window, block_size=self.block_size, implementation=impl,
                                  sm_scale=self.softmax_scale)
            return project_heads(self.o_proj, out[..., :v_dim])

    def decode(
        self,
        x: Float[Array, "batch seq hidden"],
        positions: Int[Array, "batch seq"],
        k_cache: Float[Array, "layers batch 1 max_len width"],
        v_cache: Float[Array, "layers batch 1 max_len 0"],
        layer: Int[Array, ""] | int,
    ) -> tuple[Float[Array, "batch seq hidden"], Float[Array, "layers batch 1 max_len width"],
               Float[Array, "layers batch 1 max_len 0"]]:
        """Attention with the compressed cache (prefill when `seq > 1`, a decode step when
        `seq == 1`), in the absorbed form of the module docstring.

        `k_cache` holds every layer's `[latent, k_rope]` per slot (this one is `layer`): this
        chunk's are written at `positions` (per row), then each query attends to the slots
        at or before its position through `cached_attention` with one kv head whose keys are
        `[latent, k_rope]` and whose values are the same slots (the output's latent part is
        kept). `v_cache` is empty (`[..., 0]`) and returned as it is: the values live in the
        latent.
        """
        if k_cache.shape[-1] != self.cache_width:
            raise InvalidValueError(
                f"MultiHeadLatentAttention.decode: k_cache {tuple(k_cache.shape)} must end in kv_lora_rank + "
                f"qk_rope_head_dim = {self.cache_width}; make it with `KVCache.init` of this model's config.")
        with jax.named_scope("attention"):
            q_nope, q_rope = self.queries(x, positions)
            latent, k_rope = self.latents(x, positions)
            slots = jnp.concatenate([latent, k_rope], axis=-1)[:, :, None, :]  # (B, T, 1, C + r)
            rows = jnp.arange(x.shape[0])[:, None]
            k_cache = k_cache.at[layer, rows, :, positions].set(slots.astype(k_cache.dtype), mode="drop")
            w_uk, w_uv = self._up_weights(q_nope.dtype)
            q_latent = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)  # W_UK folded into the query
            q = jnp.concatenate([q_latent, q_rope], axis=-1)  # (B, T, H, C + r)
            out = cached_attention(q, k_cache, k_cache, layer, positions, block=self.block_size,
                                   window=self.sliding_window, sm_scale=self.softmax_scale)
            out = jnp.einsum("bthc,chv->bthv", out[..., :self.kv_lora_rank], w_uv)  # W_UV folded into the output
            return project_heads(self.o_proj, out), k_cache, v_cache
