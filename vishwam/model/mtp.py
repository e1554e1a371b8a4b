"""Multi-token prediction (DeepSeek-V3 MTP): modules that each predict one token further ahead.

Module k (k = 1..D, `ModelConfig.mtp_depth`) reads at position i the hidden state of the
depth before, `h[k-1, i]` (the model's final hidden states, after its final norm, for k = 1)
and the embedding of token `i + k`, and predicts token `i + k + 1`:

    u = eh_proj([enorm(embed(t[i + k])), hnorm(h[k-1, i])])     # 2H -> H, embedding first
    h[k, i] = block(u)[i]                                        # one causal transformer block
    logits = norm(h[k, i]) @ head                                # the model's LM head

The embedding and the head are the model's own (shared, not copied); each module has its own
norms, projection and block (the block of the kind of the model's last layer: MoE in a MoE
model). The concatenation order, embedding then hidden state, is that of DeepSeek-V3's
released `eh_proj` weights.

Sequences keep their length: the token `k` ahead is the sequence shifted left by `k`, so every
depth runs the same shapes. Position i is *valid* at depth k (`mtp_valid`) when token `i + k`
exists and, in a packed batch, lies in i's document; the others are out of the loss and of the
MoE statistics. Attention is causal and documents are contiguous, so no valid position ever
attends to an invalid one: the result at valid positions equals running the block on the
truncated sequence `[0, seq - k)` (except that with a capacity-limited MoE dispatch the invalid
positions still compete for expert slots).

The modules' MoE blocks add their balance and router z-losses to the step's aux loss, and their
loads update their aux-free selection bias (`VishwamAI.update_router_bias`) as the model's layers' do.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..config import ModelConfig
from ..nn.block import Block
from ..nn.linear import Linear
from ..nn.norm import RMSNorm, TPULayerNorm, make_norm
from ..nn.precision import dtype_from_name
from ..nn.stack import apply_remat


def shift_left(x: Array, k: int, fill=0) -> Array:
    """`x[:, k:]` padded back to `x`'s length with `fill` at the end: position i holds `x[:, i + k]`."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], k, *x.shape[2:]), fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def mtp_valid(
    shape: tuple[int, int], k: int, segment_ids: Int[Array, "batch seq"] | None = None
) -> Bool[Array, "batch seq"]:
    """True where depth `k` has a token `i + k` in position i's document: `i < seq - k` and,
    with `segment_ids`, the same id at `i` and `i + k`."""
    batch, seq = shape
    valid = jnp.broadcast_to(jnp.arange(seq) < seq - k, (batch, seq))
    if segment_ids is not None:
        valid = valid & (shift_left(segment_ids, k, fill=-1) == segment_ids)
    return valid


def mtp_targets(
    targets: Int[Array, "batch seq"],
    loss_mask: Float[Array, "batch seq"],
    depth: int,
    segment_ids: Int[Array, "batch seq"] | None = None,
) -> tuple[Int[Array, "batch depth seq"], Float[Array, "batch depth seq"]]:
    """Targets and loss masks of depths 1..`depth` (depth-axis index k - 1): at depth k, position i predicts
    `targets[:, i + k]` (token `i + k + 1`) weighted by `loss_mask[:, i + k]`, and 0 where
    `mtp_valid` is False."""
    shifted_targets, masks = [], []
    for k in range(1, depth + 1):
        valid = mtp_valid(targets.shape, k, segment_ids)
        shifted_targets.append(shift_left(targets, k))
        masks.append(jnp.where(valid, shift_left(loss_mask, k), 0).astype(loss_mask.dtype))
    return jnp.stack(shifted_targets, axis=1), jnp.stack(masks, axis=1)


class MTPModule(eqx.Module):
    """One depth of multi-token prediction: `enorm`, `hnorm`, `eh_proj` (`[2 * hidden, hidden]`),
    one transformer `block`, and the final `norm` before the shared LM head."""

    enorm: RMSNorm | TPULayerNorm
    hnorm: RMSNorm | TPULayerNorm
    eh_proj: Linear
    block: Block
    norm: RMSNorm | TPULayerNorm

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        k_proj, k_block = jax.random.split(key)
        dtype = dtype_from_name(config.param_dtype)
        h = config.hidden_size
        self.enorm = make_norm(config.norm_type, h, config.norm_eps, dtype=dtype)
        self.hnorm = make_norm(config.norm_type, h, config.norm_eps, dtype=dtype)
        self.eh_proj = Linear(2 * h, h, use_bias=False, init_std=config.init_std, dtype=dtype, key=k_proj)
        self.block = Block(config, config.layer_is_moe(config.num_layers - 1), key=k_block)
        self.norm = make_norm(config.norm_type, h, config.norm_eps, dtype=dtype)

    def __call__(
        self,
        hidden: Float[Array, "batch seq hidden"],
        embedded: Float[Array, "batch seq hidden"],
        *,
        positions: Int[Array, "batch seq"],
        segment_ids: Int[Array, "batch seq"] | None = None,
        token_mask: Bool[Array, "batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "batch seq hidden"], dict]:
        """This depth's hidden states (before `norm`, as the next depth reads them) from the previous
        depth's and the embeddings of the tokens this depth looks ahead to; and the block's MoE aux."""
        u = self.eh_proj(jnp.concatenate([self.enorm(embedded), self.hnorm(hidden).astype(embedded.dtype)], -1))
        return self.block(u, positions=positions, segment_ids=segment_ids, token_mask=token_mask, key=key,
                          inference=inference)


def build_mtp(config: ModelConfig, *, key: PRNGKeyArray) -> tuple[MTPModule, ...] | None:
    """The `config.mtp_depth` modules, or None without multi-token prediction."""
    if config.mtp_depth == 0:
        return None
    return tuple(MTPModule(config, key=k) for k in jax.random.split(key, config.mtp_depth))


def run_mtp(
    modules: tuple[MTPModule, ...],
    hidden: Float[Array, "batch seq hidden"],
    embedded: Float[Array, "batch seq hidden"],
    *,
    positions: Int[Array, "batch seq"],
    segment_ids: Int[Array, "batch seq"] | None = None,
    token_mask: Bool[Array, "batch seq"] | None = None,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
    remat: str = "none",
) -> tuple[Float[Array, "batch depth seq hidden"], dict]:
    """Every depth's normed hidden states, ready for the LM head, and the MoE aux of their blocks.

    Arguments:
        hidden: the model's final hidden states (after its final norm).
        embedded: the model's embeddings of the tokens (`[batch, seq, hidden]`, compute dtype).
        token_mask: the tokens the MoE statistics count; each depth further drops the positions
            `mtp_valid` rejects.
        remat: the model's remat policy, applied to each module.

    Returns:
        `(hidden [batch, depth, seq, hidden], aux)` (batch first: a batch-sharded input stays
        sharded on the leading axis when depth and batch are merged for the head); aux has
        `load_balancing_loss` and `router_z_loss`, means over the modules' MoE blocks (0 when their
        blocks are dense), and `expert_load` `[mtp_moe_blocks, experts]` (no rows when dense).
    """
    keys = [None] * len(modules) if key is None else list(jax.random.split(key, len(modules)))
    outputs, balance, z, loads = [], [], [], []
    for k, (module, module_key) in enumerate(zip(modules, keys), start=1):
        valid = mtp_valid(hidden.shape[:2], k, segment_ids)
        mask = valid if token_mask is None else valid & token_mask

        def step(module, h, e, mask, module_key):
            return module(h, e, positions=positions, segment_ids=segment_ids, token_mask=mask, key=module_key,
                          inference=inference)

        hidden, aux = apply_remat(step, remat)(module, hidden, shift_left(embedded, k), mask, module_key)
        outputs.append(module.norm(hidden))
        if module.block.is_moe:
            balance.append(aux["load_balancing_loss"])
            z.append(aux["router_z_loss"])
            loads.append(aux["expert_load"])
    zero = jnp.zeros((), jnp.float32)
    experts = modules[0].block.mlp.num_experts if loads else 0
    aux = {"load_balancing_loss": jnp.mean(jnp.stack(balance)) if balance else zero,
           "router_z_loss": jnp.mean(jnp.stack(z)) if z else zero,
           "expert_load": jnp.stack(loads) if loads else jnp.zeros((0, experts), jnp.float32)}
    return jnp.stack(outputs, axis=1), aux
