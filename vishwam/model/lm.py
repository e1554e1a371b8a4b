"""`VishwamAI`: token embedding -> scanned stacks of blocks -> final norm -> LM head."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..arrays import partition_arrays
from ..config import ModelConfig
from ..errors import InvalidValueError
from ..nn.attention import default_positions
from ..nn.block import Block
from ..nn.linear import Linear
from ..nn.moe import BalanceSums, pooled_balance_loss, split_experts
from ..nn.norm import RMSNorm, TPULayerNorm, make_norm
from ..nn.precision import Precision, dtype_from_name
from ..nn.stack import Stage, build_stages, run_stages, split_layers, split_moe_rows, unstack_layers
from .mtp import MTPModule, build_mtp, run_mtp


SPLIT_EXPERTS_MAX = 16
"""`VishwamAI.decode_layers` splits a MoE layer's experts (one array each, read in place)
only up to this many experts; more stay stacked, decoded by the `grouped` dispatch's run-time
loop over the chosen experts, so the decode program does not grow with the expert count.
The trade (`benchmarks/moe_decode.py`, 2-core CPU, 2026-12-06; stacked / split): compile +
first call 0.83x at 8 experts, 0.74x at 16, 0.26x at 64, 0.07x at 256 (46.7 s -> 3.4 s); a
warm 64-token greedy decode 1.12-1.21x slower stacked at every count. `generate` compiles per
prompt width and the serve engine compiles dozens of programs, so above 16 experts the
compile time wins."""


class KVCache(eqx.Module):
    """Preallocated keys and values of every layer, `[layers, batch, kv_heads, max_len, head_dim]`.

    Head-major, so that a decode step's attention is a batched matmul over each kv
    head's `[max_len, head_dim]` slab (on XLA:CPU about 6x faster than over the
    sequence-major layout, which needs a transpose per step).

    Multi-head latent attention (`attention="mla"`) caches the compressed form instead:
    `k` is `[layers, batch, 1, max_len, kv_lora_rank + qk_rope_head_dim]` (each token's kv
    latent and shared rotary key, `vishwam.nn.mla`) and `v` is empty (`[..., 0]`)."""

    k: Float[Array, "layers batch kv_heads max_len k_dim"]
    v: Float[Array, "layers batch kv_heads max_len v_dim"]

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        if max_len > config.max_seq_len:
            raise InvalidValueError(
                f"KVCache: max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}."
            )
        dtype = dtype_from_name(config.compute_dtype) if dtype is None else dtype
        k_shape, v_shape = cache_shapes(config, batch, max_len)
        return cls(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype))


def cache_shapes(config: ModelConfig, batch: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of `KVCache.k` and `KVCache.v` for `config` (see `KVCache`)."""
    if config.is_mla:
        return ((config.num_layers, batch, 1, max_len, config.kv_lora_rank + config.qk_rope_head_dim),
                (config.num_layers, batch, 1, max_len, 0))
    shape = (config.num_layers, batch, config.kv_heads, max_len, config.dim_per_head)
    return shape, shape

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def _empty_aux(config: ModelConfig) -> dict:
    zero = jnp.zeros((), jnp.float32)
    return {
        "load_balancing_loss": zero,
        "router_z_loss": zero,
        "expert_load": jnp.zeros((0, config.num_experts), jnp.float32),
        "dropped_fraction": zero,
        "expert_dropped": jnp.zeros((0, config.num_experts), jnp.float32),
        "router_entropy": jnp.zeros((0,), jnp.float32),
    }


def _merge_aux(config: ModelConfig, per_stage: list[list[dict]]) -> dict:
    """Per-layer MoE aux (stacked over repeats by scan) -> model-level aux.

    Losses and the dropped fraction are means over MoE layers, except the `hf` balance
    loss, which pools every layer's tokens (`pooled_balance_loss` of the layers' summed
    `BalanceSums`, as transformers computes it); `expert_load` and `expert_dropped` are
    `[num_moe_layers, num_experts]`, `router_entropy` `[num_moe_layers]`, in layer order.
    """
    loads, lb, z, dropped, sums = [], [], [], [], []
    expert_dropped, entropy, bias = [], [], []
    for stage_auxes in per_stage:
        if not stage_auxes:
            continue
        # (repeats, moe blocks in pattern, ...) -> layer order
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs, axis=1), *stage_auxes)
        loads.append(stacked["expert_load"].reshape(-1, config.num_experts))
        lb.append(stacked["load_balancing_loss"].reshape(-1))
        z.append(stacked["router_z_loss"].reshape(-1))
        dropped.append(stacked["dropped_fraction"].reshape(-1))
        expert_dropped.append(stacked["expert_dropped"].reshape(-1, config.num_experts))
        entropy.append(stacked["router_entropy"].reshape(-1))
        if "router_bias" in stacked:
            bias.append(stacked["router_bias"].reshape(-1, config.num_experts))
        if "balance_counts" in stacked:
            sums.append(BalanceSums(*(jnp.sum(stacked[name].reshape(-1, *shape), axis=0) for name, shape in
                                      (("balance_counts", (config.num_experts,)),
                                       ("balance_probs", (config.num_experts,)), ("balance_tokens", ())))))
    if not loads:
        return _empty_aux(config)
    if sums:
        balance = pooled_balance_loss(jax.tree_util.tree_map(lambda *xs: sum(xs), *sums), config.num_experts)
    else:
        balance = jnp.mean(jnp.concatenate(lb))
    stats = {"router_bias": jnp.concatenate(bias)} if bias else {}
    return {
        "load_balancing_loss": balance,
        "router_z_loss": jnp.mean(jnp.concatenate(z)),
        "expert_load": jnp.concatenate(loads),
        "dropped_fraction": jnp.mean(jnp.concatenate(dropped)),
        "expert_dropped": jnp.concatenate(expert_dropped),
        "router_entropy": jnp.concatenate(entropy),
        **stats,
    }


class VishwamAI(eqx.Module):
    """The VishwamAI Mixture-of-Experts transformer language model.

    Layers are built with `eqx.filter_vmap` (stacked weights) and run with
    `jax.lax.scan`, so compile time does not grow with depth; `config.scan_layers=False`
    runs the same weights unrolled (debugging; tested equal).
    """

    embed: Float[Array, "vocab hidden"]
    stages: tuple[Stage, ...]
    final_norm: RMSNorm | TPULayerNorm
    lm_head: Linear | None
    mtp: tuple[MTPModule, ...] | None
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        dtype = dtype_from_name(config.param_dtype)
        k_embed, k_head, k_layers = jax.random.split(key, 3)
        self.embed = (config.init_std * jax.random.normal(k_embed, (config.vocab_size, config.hidden_size))).astype(dtype)
        self.stages = build_stages(config, key=k_layers)
        self.final_norm = make_norm(config.norm_type, config.hidden_size, config.norm_eps, dtype=dtype)
        self.lm_head = (
            None if config.tie_embeddings
            else Linear(config.hidden_size, config.vocab_size, use_bias=False, init_std=config.init_std,
                        dtype=dtype, key=k_head)
        )
        # A key of its own (folded, not split from `key`), so that a model without MTP draws
        # exactly the weights it drew before MTP existed.
        self.mtp = build_mtp(config, key=jax.random.fold_in(key, 1))
        self.config = config

    # ------------------------------------------------------------------ helpers
    @property
    def precision(self) -> Precision:
        return Precision.from_config(self.config)

    def _embed(self, tokens):
        return self.embed[tokens].astype(self.precision.compute_dtype)

    @property
    def head_weight(self) -> Float[Array, "hidden vocab"]:
        """The LM head as a `[hidden, vocab]` matrix (the embedding's transpose when tied)."""
        return self.embed.T if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: Float[Array, "*batch hidden"]) -> Float[Array, "*batch vocab"]:
        """fp32 logits of final hidden states (as returned by `features`)."""
        with jax.named_scope("lm_head"):
            head = self.head_weight
            return jnp.einsum("...d,dv->...v", hidden, head.astype(hidden.dtype),
                              preferred_element_type=jnp.float32)

    # -------------------------------------------------------------------- calls
    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        segment_ids: Int[Array, "batch seq"] | None = None,
        positions: Int[Array, "batch seq"] | None = None,
        token_mask: Bool[Array, "batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "batch seq vocab"], dict]:
        """Logits (fp32) for every position, and the MoE aux pytree.

        `model.logits(model.features(tokens, ...)[0])` is the same computation in
        two halves; the train step uses the halves to fuse the LM head with the loss
        (`vishwam.train.losses.chunked_lse_and_target`) and never hold all logits.
        Arguments as for `features`.

        Returns:
            `(logits, aux)`; aux has `load_balancing_loss`, `router_z_loss`,
            `dropped_fraction` (means over MoE layers), `expert_load` and `expert_dropped`
            `[num_moe_layers, num_experts]`, `router_entropy` `[num_moe_layers]`, and with
            `aux_free_bias` the selection bias the routing used, `router_bias`
            `[num_moe_layers, num_experts]`.
        """
        hidden, aux = self.features(tokens, segment_ids=segment_ids, positions=positions, token_mask=token_mask,
                                    key=key, inference=inference)
        return self.logits(hidden), aux

    def features(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        segment_ids: Int[Array, "batch seq"] | None = None,
        positions: Int[Array, "batch seq"] | None = None,
        token_mask: Bool[Array, "batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        mtp: bool = False,
    ) -> tuple[Float[Array, "batch seq hidden"], dict]:
        """Final hidden states (after the final norm, in the compute dtype) and the MoE aux pytree.

        Arguments:
            tokens: token ids.
            segment_ids: packed documents; attention never crosses a change of id.
            positions: RoPE positions; default `0..seq-1`, restarting per document
                when `segment_ids` is given.
            token_mask: the tokens the MoE statistics count (True; the aux losses,
                `expert_load` and so the aux-free bias update); default every token.
                The train step passes the batch's non-padding tokens.
            key: enables dropout and router jitter (training); `None` disables them.
            inference: no dropout/jitter, and MoE layers route without dropping tokens.
            mtp: also run the multi-token prediction modules (`config.mtp_depth > 0`; the
                train step asks for them): aux then has `mtp`, a dict of `hidden`
                `[batch, mtp_depth, seq, hidden]` (each depth's normed hidden states, position
                i predicting token `i + depth + 1` through `head_weight`) and the MoE losses of
                the modules' blocks (`vishwam.model.mtp.run_mtp`).

        Returns:
            `(hidden, aux)` with aux as in `__call__`.
        """
        if mtp and self.mtp is None:
            raise InvalidValueError("VishwamAI.features(mtp=True): this model has no multi-token prediction "
                                    "modules; build it with ModelConfig(mtp_depth=D > 0) or drop mtp=True.")
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InvalidValueError(f"VishwamAI: tokens must be integer ids [batch, seq], got {tokens.dtype} of shape "
                                    f"{tuple(tokens.shape)}; add a batch axis with tokens[None] / cast with .astype(jnp.int32).")
        if tokens.shape[1] > self.config.max_seq_len:
            raise InvalidValueError(
                f"VishwamAI: sequence length {tokens.shape[1]} exceeds max_seq_len={self.config.max_seq_len}."
            )
        if token_mask is not None and token_mask.shape != tokens.shape:
            raise InvalidValueError(f"VishwamAI: token_mask must have the tokens' shape {tuple(tokens.shape)}, got "
                                    f"{tuple(token_mask.shape)}; pass one value per token (True = counted).")
        if positions is None:
            positions = default_positions(segment_ids, tokens.shape)
        layer_keys = None if key is None else jax.random.split(key, self.config.num_layers)

        def body(x, blocks, keys):
            auxes = []
            for j, block in enumerate(blocks):
                x, aux = block(x, positions=positions, segment_ids=segment_ids, token_mask=token_mask,
                               key=None if keys is None else keys[j], inference=inference)
                if block.is_moe:
                    auxes.append(aux)
            return x, auxes

        xs = [None] * len(self.stages) if layer_keys is None else split_layers(self.stages, layer_keys)
        embedded = self._embed(tokens)
        x, per_stage = run_stages(self.stages, body, embedded, xs, remat=self.config.remat_policy,
                                  scan=self.config.scan_layers)
        hidden, aux = self.final_norm(x), _merge_aux(self.config, per_stage)
        if mtp:
            # `fold_in`, not one more split: the layers' keys stay those of a model without MTP.
            mtp_key = None if key is None else jax.random.fold_in(key, self.config.num_layers)
            mtp_hidden, mtp_aux = run_mtp(self.mtp, hidden, embedded, positions=positions, segment_ids=segment_ids,
                                          token_mask=token_mask, key=mtp_key, inference=inference,
                                          remat=self.config.remat_policy)
            aux["mtp"] = {"hidden": mtp_hidden, **mtp_aux}
        return hidden, aux

    def decode(
        self,
        tokens: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"],
        cache: KVCache,
        layers: tuple[Block, ...] | None = None,
    ) -> tuple[Float[Array, "batch seq vocab"], KVCache]:
        """Cached forward: writes this chunk's keys/values at `positions` and
        attends to everything cached at or before each position. Prefill passes
        the whole prompt; a decode step passes one token per row.

        The whole cache is the carry of the loop over layers (each layer updates its
        own slice in place), never split into per-layer pieces and stacked again: in a
        decode loop that would copy the cache several times per token.

        Arguments:
            layers: this model's `decode_layers()`: run them one after the other
                instead of scanning over the stacked weights (what `generate` does
                on CPU).
        """
        hidden, cache = self.decode_hidden(tokens, positions, cache, layers)
        return self.logits(hidden), cache

    def decode_hidden(
        self,
        tokens: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"],
        cache: KVCache,
        layers: tuple[Block, ...] | None = None,
    ) -> tuple[Float[Array, "batch seq hidden"], KVCache]:
        """`decode` up to the final norm: the hidden states the head turns into logits
        (`logits(decode_hidden(...)[0])` is `decode`'s). A prefill takes the head of each
        row's last prompt token only, not of every position: a `[batch, width, vocab]`
        fp32 array at the seed's vocabulary of 131072 is 0.5 MiB per prompt token."""
        x, k, v = self._embed(tokens), cache.k, cache.v
        if layers is not None:
            for layer, block in enumerate(layers):
                x, k, v = block.decode(x, positions, k, v, layer)
            return self.final_norm(x), KVCache(k, v)
        def body(carry, blocks, layer_numbers):
            x, k, v = carry
            for j, block in enumerate(blocks):
                x, k, v = block.decode(x, positions, k, v, layer_numbers[j])
            return (x, k, v), None

        layer_numbers = split_layers(self.stages, jnp.arange(self.config.num_layers, dtype=jnp.int32))
        (x, k, v), _ = run_stages(self.stages, body, (x, k, v), layer_numbers, scan=self.config.scan_layers)
        return self.final_norm(x), KVCache(k, v)

    def decode_layers(self) -> tuple[Block, ...]:
        """Every layer as a `Block` with arrays of its own, the experts of a MoE layer with at
        most `SPLIT_EXPERTS_MAX` experts split per expert (`vishwam.nn.moe.split_experts`);
        for `decode(..., layers=...)`. Eager (call it outside jit): it copies the layers'
        weights once.

        Why: inside a compiled loop, XLA:CPU copies each layer's weights out of the
        stacked arrays before multiplying (and each chosen expert's out of the stacked
        experts); at a decode step's few rows the copies cost as much as the matmuls.
        Separate arrays are read in place (measured: a 6-layer dense decode loop ~1.35x
        faster on the 2-core CPU). Split experts cost a branch per expert in the compiled
        program, though, so many experts stay stacked (see `SPLIT_EXPERTS_MAX`).
        """
        def split(layer: Block) -> Block:
            if not layer.is_moe or layer.mlp.num_experts > SPLIT_EXPERTS_MAX:
                return layer
            return eqx.tree_at(lambda b: b.mlp.experts, layer, split_experts(layer.mlp.experts))

        return unstack_layers(self.stages, split)

    def with_config(self, config: ModelConfig) -> "VishwamAI":
        """The same weights under a config that changes only how they are run
        (scan/unroll, remat, compute dtype, attention backend, MoE dispatch, dropout,
        fp8 flags...). Raises if the new config changes any parameter's shape."""
        new_arrays, new_static = partition_arrays(abstract_model(config))
        new_leaves, treedef = jax.tree_util.tree_flatten_with_path(new_arrays)
        old_leaves, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(self, eqx.is_array))
        new_sig = [(jax.tree_util.keystr(p), x.shape) for p, x in new_leaves]
        old_sig = [(jax.tree_util.keystr(p), x.shape) for p, x in old_leaves]
        if new_sig != old_sig:
            raise InvalidValueError(
                "VishwamAI.with_config: the new config changes the parameters, so the weights cannot be "
                f"reused; differing fields: {self.config.diff(config)}. Build a new model instead."
            )
        arrays = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(new_arrays),
            [old.astype(new.dtype) for (_, old), (_, new) in zip(old_leaves, new_leaves)],
        )
        return eqx.combine(arrays, new_static)

    def update_router_bias(self, expert_load: Float[Array, "moe_layers experts"],
                           mtp_expert_load: Float[Array, "mtp_moe_layers experts"] | None = None) -> "VishwamAI":
        """Aux-loss-free balancing step (outside the gradient): raise the selection
        bias of under-loaded experts and lower it for over-loaded ones,
        `bias += rate * sign(1/E - load)`. A no-op unless `config.aux_free_bias`.
        `mtp_expert_load` (`features(..., mtp=True)`'s `aux["mtp"]["expert_load"]`) updates
        the multi-token prediction modules' MoE blocks too."""
        if not self.config.aux_free_bias or not self.config.is_moe:
            return self
        target = 1.0 / self.config.num_experts

        def bias_update(load):
            return self.config.aux_free_bias_rate * jnp.sign(target - jax.lax.stop_gradient(load))

        model = self
        if mtp_expert_load is not None:
            moe_modules = [i for i, module in enumerate(self.mtp) if module.block.is_moe]
            for row, i in enumerate(moe_modules):
                bias = model.mtp[i].block.mlp.selection_bias
                model = eqx.tree_at(lambda m, i=i: m.mtp[i].block.mlp.selection_bias, model,
                                    bias + bias_update(mtp_expert_load[row]).astype(bias.dtype))
        update = bias_update(expert_load)
        pieces = iter(split_moe_rows(self.stages, update))
        stages = []
        for stage in self.stages:
            blocks = []
            for block in stage.blocks:
                if block.is_moe:
                    rows = next(pieces)
                    block = eqx.tree_at(lambda b: b.mlp.selection_bias, block,
                                        block.mlp.selection_bias + rows.astype(block.mlp.selection_bias.dtype))
                blocks.append(block)
            stages.append(Stage(tuple(blocks), stage.repeats))
        return eqx.tree_at(lambda m: m.stages, model, tuple(stages))

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        return KVCache.init(self.config, batch, self.config.max_seq_len if max_len is None else max_len, dtype)


def abstract_model(config: ModelConfig) -> VishwamAI:
    """The model of `config` as `jax.ShapeDtypeStruct` leaves: `eqx.filter_eval_shape`, nothing allocated."""
    return eqx.filter_eval_shape(VishwamAI, config, key=jax.random.key(0))
