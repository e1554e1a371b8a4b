"""`VishwamAI`: token embedding -> scanned stacks of blocks -> final norm -> LM head."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .config import ModelConfig
from .nn.attention import default_positions
from .nn.block import Block
from .nn.linear import Linear
from .nn.moe import split_experts
from .nn.norm import RMSNorm, TPULayerNorm, make_norm
from .nn.precision import Precision, dtype_from_name


def stage_plan(config: ModelConfig) -> list[tuple[tuple[bool, ...], int]]:
    """The layer stack as `(pattern, repeats)` stages; `pattern[j]` says whether
    the j-th block of one repeat is MoE. Layers run stage by stage, each stage
    scanning `repeats` times over its pattern."""
    if not config.is_moe:
        return [((False,), config.num_layers)]
    plan = []
    if config.first_dense_layers:
        plan.append(((False,), config.first_dense_layers))
    rest = config.num_layers - config.first_dense_layers
    if rest:
        n = config.moe_every
        plan.append(((False,) * (n - 1) + (True,), rest // n))
    return plan


class Stage(eqx.Module):
    """A repeated pattern of blocks; each block's arrays carry a leading `repeats` axis."""

    blocks: tuple[Block, ...]
    repeats: int = eqx.field(static=True)


class KVCache(eqx.Module):
    """Preallocated keys and values of every layer, `[layers, batch, kv_heads, max_len, head_dim]`.

    Head-major, so that a decode step's attention is a batched matmul over each kv
    head's `[max_len, head_dim]` slab (on XLA:CPU about 6x faster than over the
    sequence-major layout, which needs a transpose per step)."""

    k: Float[Array, "layers batch kv_heads max_len head_dim"]
    v: Float[Array, "layers batch kv_heads max_len head_dim"]

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        if max_len > config.max_seq_len:
            raise ValueError(
                f"KVCache: max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}."
            )
        dtype = dtype_from_name(config.compute_dtype) if dtype is None else dtype
        shape = (config.num_layers, batch, config.kv_heads, max_len, config.dim_per_head)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


_REMAT_POLICIES = {
    "dots_saveable": lambda: jax.checkpoint_policies.dots_saveable,
    "save_attention_output": lambda: jax.checkpoint_policies.save_only_these_names("attention_output"),
    "offload_dots": lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def apply_remat(fn, policy: str):
    """Wrap a scan body in `jax.checkpoint` according to the config's remat policy."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    if policy in _REMAT_POLICIES:
        return jax.checkpoint(fn, prevent_cse=False, policy=_REMAT_POLICIES[policy]())
    raise ValueError(f"Unknown remat policy {policy!r}; choose none, full, {', '.join(_REMAT_POLICIES)}.")


def _empty_aux(config: ModelConfig) -> dict:
    zero = jnp.zeros((), jnp.float32)
    return {
        "load_balancing_loss": zero,
        "router_z_loss": zero,
        "expert_load": jnp.zeros((0, config.num_experts), jnp.float32),
        "dropped_fraction": zero,
    }


def _merge_aux(config: ModelConfig, per_stage: list[list[dict]]) -> dict:
    """Per-layer MoE aux (stacked over repeats by scan) -> model-level aux.

    Losses and the dropped fraction are means over MoE layers; `expert_load` is
    `[num_moe_layers, num_experts]` in layer order.
    """
    loads, lb, z, dropped = [], [], [], []
    for stage_auxes in per_stage:
        if not stage_auxes:
            continue
        # (repeats, moe blocks in pattern, ...) -> layer order
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs, axis=1), *stage_auxes)
        loads.append(stacked["expert_load"].reshape(-1, config.num_experts))
        lb.append(stacked["load_balancing_loss"].reshape(-1))
        z.append(stacked["router_z_loss"].reshape(-1))
        dropped.append(stacked["dropped_fraction"].reshape(-1))
    if not loads:
        return _empty_aux(config)
    return {
        "load_balancing_loss": jnp.mean(jnp.concatenate(lb)),
        "router_z_loss": jnp.mean(jnp.concatenate(z)),
        "expert_load": jnp.concatenate(loads),
        "dropped_fraction": jnp.mean(jnp.concatenate(dropped)),
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
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        dtype = dtype_from_name(config.param_dtype)
        k_embed, k_head, k_layers = jax.random.split(key, 3)
        self.embed = (config.init_std * jax.random.normal(k_embed, (config.vocab_size, config.hidden_size))).astype(dtype)
        layer_keys = jax.random.split(k_layers, config.num_layers)
        stages, offset = [], 0
        for pattern, repeats in stage_plan(config):
            n = len(pattern) * repeats
            keys = layer_keys[offset:offset + n].reshape(repeats, len(pattern))
            offset += n
            blocks = tuple(
                eqx.filter_vmap(lambda k, m=is_moe: Block(config, m, key=k))(keys[:, j])
                for j, is_moe in enumerate(pattern)
            )
            stages.append(Stage(blocks, repeats))
        self.stages = tuple(stages)
        self.final_norm = make_norm(config.norm_type, config.hidden_size, config.norm_eps, dtype=dtype)
        self.lm_head = (
            None if config.tie_embeddings
            else Linear(config.hidden_size, config.vocab_size, use_bias=False, init_std=config.init_std,
                        dtype=dtype, key=k_head)
        )
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

    def _run_stages(self, body, x, xs_per_stage):
        """Run `body(x, blocks, xs) -> (x, ys)` over every layer repeat of every stage."""
        outputs = []
        for stage, xs in zip(self.stages, xs_per_stage):
            params, static = eqx.partition(stage.blocks, eqx.is_array)

            def step(carry, scanned, static=static):
                layer_params, layer_xs = scanned
                return body(carry, eqx.combine(layer_params, static), layer_xs)

            step = apply_remat(step, self.config.remat_policy)
            if self.config.scan_layers:
                x, ys = jax.lax.scan(step, x, (params, xs))
            else:
                ys_list = []
                for i in range(stage.repeats):
                    x, y = step(x, jax.tree_util.tree_map(lambda a: a[i], (params, xs)))
                    ys_list.append(y)
                ys = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys_list)
            outputs.append(ys)
        return x, outputs

    def _split_layers(self, array):
        """Split a `[num_layers, ...]` array into per-stage `[repeats, pattern, ...]` pieces."""
        pieces, offset = [], 0
        for stage in self.stages:
            n = stage.repeats * len(stage.blocks)
            pieces.append(array[offset:offset + n].reshape(stage.repeats, len(stage.blocks), *array.shape[1:]))
            offset += n
        return pieces

    # -------------------------------------------------------------------- calls
    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        segment_ids: Int[Array, "batch seq"] | None = None,
        positions: Int[Array, "batch seq"] | None = None,
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
            `dropped_fraction` (means over MoE layers) and `expert_load`
            `[num_moe_layers, num_experts]`.
        """
        hidden, aux = self.features(tokens, segment_ids=segment_ids, positions=positions, key=key,
                                    inference=inference)
        return self.logits(hidden), aux

    def features(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        segment_ids: Int[Array, "batch seq"] | None = None,
        positions: Int[Array, "batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "batch seq hidden"], dict]:
        """Final hidden states (after the final norm, in the compute dtype) and the MoE aux pytree.

        Arguments:
            tokens: token ids.
            segment_ids: packed documents; attention never crosses a change of id.
            positions: RoPE positions; default `0..seq-1`, restarting per document
                when `segment_ids` is given.
            key: enables dropout and router jitter (training); `None` disables them.
            inference: no dropout/jitter, and MoE layers route without dropping tokens.

        Returns:
            `(hidden, aux)` with aux as in `__call__`.
        """
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"VishwamAI: sequence length {tokens.shape[1]} exceeds max_seq_len={self.config.max_seq_len}."
            )
        if positions is None:
            positions = default_positions(segment_ids, tokens.shape)
        layer_keys = None if key is None else jax.random.split(key, self.config.num_layers)

        def body(x, blocks, keys):
            auxes = []
            for j, block in enumerate(blocks):
                x, aux = block(x, positions=positions, segment_ids=segment_ids,
                               key=None if keys is None else keys[j], inference=inference)
                if block.is_moe:
                    auxes.append(aux)
            return x, auxes

        xs = [None] * len(self.stages) if layer_keys is None else self._split_layers(layer_keys)
        x, per_stage = self._run_stages(body, self._embed(tokens), xs)
        return self.final_norm(x), _merge_aux(self.config, per_stage)

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
        x, k, v = self._embed(tokens), cache.k, cache.v
        if layers is not None:
            for layer, block in enumerate(layers):
                x, k, v = block.decode(x, positions, k, v, layer)
            return self.logits(self.final_norm(x)), KVCache(k, v)
        first_layer = 0
        for stage in self.stages:
            params, static = eqx.partition(stage.blocks, eqx.is_array)
            pattern = len(stage.blocks)

            def step(carry, scanned, static=static, first_layer=first_layer, pattern=pattern):
                x, k, v = carry
                layer_params, repeat = scanned
                for j, block in enumerate(eqx.combine(layer_params, static)):
                    x, k, v = block.decode(x, positions, k, v, first_layer + repeat * pattern + j)
                return (x, k, v), None

            repeats = jnp.arange(stage.repeats, dtype=jnp.int32)
            if self.config.scan_layers:
                (x, k, v), _ = jax.lax.scan(step, (x, k, v), (params, repeats))
            else:
                for i in range(stage.repeats):
                    (x, k, v), _ = step((x, k, v), (jax.tree_util.tree_map(lambda a: a[i], params), i))
            first_layer += stage.repeats * pattern
        return self.logits(self.final_norm(x)), KVCache(k, v)

    def decode_layers(self) -> tuple[Block, ...]:
        """Every layer as a `Block` with arrays of its own, MoE experts split per expert
        (`vishwam.nn.moe.split_experts`); for `decode(..., layers=...)`. Eager (call it
        outside jit): it copies the layers' weights once.

        Why: inside a compiled loop, XLA:CPU copies each layer's weights out of the
        stacked arrays before multiplying (and each chosen expert's out of the stacked
        experts); at a decode step's few rows the copies cost as much as the matmuls.
        Separate arrays are read in place (measured: a 6-layer dense decode loop ~1.35x
        faster on the 2-core CPU).
        """
        layers = []
        for stage in self.stages:
            for i in range(stage.repeats):
                for block in stage.blocks:
                    layer = jax.tree_util.tree_map(lambda a, i=i: jnp.array(a[i]) if eqx.is_array(a) else a, block)
                    if layer.is_moe:
                        layer = eqx.tree_at(lambda b: b.mlp.experts, layer, split_experts(layer.mlp.experts))
                    layers.append(layer)
        return tuple(layers)

    def with_config(self, config: ModelConfig) -> "VishwamAI":
        """The same weights under a config that changes only how they are run
        (scan/unroll, remat, compute dtype, attention backend, MoE dispatch, dropout,
        fp8 flags...). Raises if the new config changes any parameter's shape."""
        abstract = eqx.filter_eval_shape(VishwamAI, config, key=jax.random.key(0))
        new_arrays, new_static = eqx.partition(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
        new_leaves, treedef = jax.tree_util.tree_flatten_with_path(new_arrays)
        old_leaves, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(self, eqx.is_array))
        new_sig = [(jax.tree_util.keystr(p), x.shape) for p, x in new_leaves]
        old_sig = [(jax.tree_util.keystr(p), x.shape) for p, x in old_leaves]
        if new_sig != old_sig:
            raise ValueError(
                "VishwamAI.with_config: the new config changes the parameters, so the weights cannot be "
                f"reused; differing fields: {self.config.diff(config)}. Build a new model instead."
            )
        arrays = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(new_arrays),
            [old.astype(new.dtype) for (_, old), (_, new) in zip(old_leaves, new_leaves)],
        )
        return eqx.combine(arrays, new_static)

    def update_router_bias(self, expert_load: Float[Array, "moe_layers experts"]) -> "VishwamAI":
        """Aux-loss-free balancing step (outside the gradient): raise the selection
        bias of under-loaded experts and lower it for over-loaded ones,
        `bias += rate * sign(1/E - load)`. A no-op unless `config.aux_free_bias`."""
        if not self.config.aux_free_bias or not self.config.is_moe:
            return self
        target = 1.0 / self.config.num_experts
        update = self.config.aux_free_bias_rate * jnp.sign(target - jax.lax.stop_gradient(expert_load))
        pieces = iter(self._split_moe_rows(update))
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
        return eqx.tree_at(lambda m: m.stages, self, tuple(stages))

    def _split_moe_rows(self, rows):
        """`[num_moe_layers, ...]` rows in layer order -> one `[repeats, ...]` piece per MoE
        block of each stage, in the order the stages and blocks are stored."""
        pieces, offset = [], 0
        for stage in self.stages:
            n_moe = sum(block.is_moe for block in stage.blocks)
            chunk = rows[offset:offset + stage.repeats * n_moe].reshape(stage.repeats, n_moe, *rows.shape[1:])
            offset += stage.repeats * n_moe
            pieces.extend(chunk[:, j] for j in range(n_moe))
        return pieces

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        return KVCache.init(self.config, batch, self.config.max_seq_len if max_len is None else max_len, dtype)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Total and active-per-token parameter counts, from abstract shapes only
    (`eqx.filter_eval_shape`: nothing is allocated, so the seed preset is instant)."""
    model = eqx.filter_eval_shape(VishwamAI, config, key=jax.random.key(0))
    total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(model)
                if isinstance(x, jax.ShapeDtypeStruct))
    routed = 0
    for stage in model.stages:
        for block in stage.blocks:
            if block.is_moe:
                routed += sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(block.mlp.experts))
    inactive = routed * (config.num_experts - config.experts_per_token) // config.num_experts if routed else 0
    return {"total": total, "active": total - inactive}
