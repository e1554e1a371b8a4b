"""The train step's multi-token prediction loss (`ModelConfig.mtp_depth`), fused with the LM head."""

import jax.numpy as jnp
from jaxtyping import Array, Float

from ..model.mtp import mtp_targets
from .losses import chunked_lse_and_target, masked_sum, moe_aux_loss, token_cross_entropy


def mtp_loss(model, aux: dict, micro: dict, normalizer: Float[Array, ""], chunk: int | None
             ) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """`(mtp, mtp_aux)` of a micro-batch, from `model.features(..., mtp=True)`'s `aux["mtp"]`.

    `mtp = mtp_loss_weight * mean over depths k of sum_i mask_k[i] * nll_k[i] / normalizer`, with
    `nll_k[i]` the cross-entropy of depth k at position i against token `i + k + 1` and `mask_k`
    the loss mask shifted to it, 0 where the depth has no such token (`vishwam.model.mtp.mtp_targets`).
    `normalizer` is the optimiser batch's token count, as for the main loss, so accumulated
    micro-batches give the full-batch value; like DeepSeek-V3's `1/T`, it does not shrink with
    the positions a depth loses at the end of each document. The head is fused with the loss and
    chunked over positions when `chunk` is set (every depth in one pass; no logits held), else
    computed from full logits. `mtp_aux` is the MTP blocks' MoE losses weighted as the model's
    (`moe_aux_loss`).
    """
    config = model.config
    hidden = aux["mtp"]["hidden"]  # (B, D, S, H)
    batch, depth, seq, width = hidden.shape
    targets, masks = mtp_targets(micro["targets"], micro["loss_mask"], depth, micro.get("segment_ids"))
    rows = hidden.reshape(batch * depth, seq, width)  # (B*D, S, H): depth rides along the batch axis
    row_targets = targets.reshape(batch * depth, seq)
    if chunk is not None:
        lse, target_logit = chunked_lse_and_target(rows, model.head_weight, row_targets, chunk)
        nll = lse - target_logit
    else:
        nll = token_cross_entropy(model.logits(rows), row_targets)
    ce = masked_sum(nll, masks.reshape(batch * depth, seq)) / (normalizer * depth)
    return jnp.float32(config.mtp_loss_weight) * ce, moe_aux_loss(aux["mtp"], config)
