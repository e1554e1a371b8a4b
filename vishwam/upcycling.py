"""Sparse upcycling: a dense model becomes a Mixture-of-Experts whose experts start as copies of its MLPs.

    moe = vishwam.upcycle("TinyLlama-1.1B/", num_experts=8, experts_per_token=2)   # an HF directory
    moe = vishwam.upcycle(dense_model, 4, 2)                                       # a dense `VishwamAI`
    moe.save("runs/tinyllama-8x")        # then: vishwam-train --init-from runs/tinyllama-8x

Every MoE layer of the result takes its attention and norms from the same dense layer, and
each of its `num_experts` experts is a copy of that layer's SwiGLU MLP (`gate`, `up`,
`down`); embeddings, final norm and LM head are the dense model's. This is Komatsuzaki et
al.'s sparse upcycling ("Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", 2023), written here for `VishwamAI`.

Why the MoE computes the dense model's function at initialisation: a token's MoE output is
`sum_i w_i E_i(x)` over its top-k experts. With identical experts that is
`(sum_i w_i) f(x)`, so it is exactly the dense `f(x)` when the chosen weights sum to one and
no assignment is dropped. `upcycle_config` therefore fixes the routing fields that decide
it: a softmax router with `router_renormalize=True` (the top-k weights renormalised to sum
to one; any router weights then give the same output), `routed_scaling_factor=1`, no shared
experts, experts as wide as the dense MLP (`moe_ffn_dim=None`), no group limit, and
`capacity_factor=None` (dropless, also in training; pass a factor to trade exactness for
the capacity dispatch's speed). The router itself is drawn like a fresh model's
(`normal(0, init_std)`, fp32): it decides which copies see which tokens, which is what
lets the copies drift apart. The aux-free selection bias (`aux_free_bias=True`) only
moves the choice, never the weights, so it keeps the function too.

Two consequences worth knowing. While the experts are still identical the routed output
does not depend on the router weights, so the router's gradient from the language-model
loss is zero at the first step; it learns from the balance loss until the experts
differ, and they differ because each receives other tokens' gradients. With
`experts_per_token=1` the renormalised weight is always 1, so the router never gets a gradient from
the language-model loss at all: use top-2 or more (Komatsuzaki et al. use top-2 in decoders).

Breaking the symmetry on purpose, at the price of exactness (both off by default):
- `noise`: every expert's `gate`, `up` and `down` get independent Gaussian noise of
  `noise * std(W)` (`W` the dense matrix).
- `reinit_fraction`: "drop-upcycling" (Nakamura et al., 2025): in every expert a different
  random `reinit_fraction` of the MLP's inner neurons (columns of `gate` and `up`, rows
  of `down`) is drawn afresh from `normal(mean(W), std(W))` of the dense matrix, so each
  expert keeps most of the dense knowledge and starts to specialise from its own part.

Public API:
    upcycle           a dense model, pipeline or directory -> the upcycled MoE (model or pipeline)
    upcycle_config    the `ModelConfig` of the MoE a dense config upcycles into
    upcycle_model     a dense `VishwamAI` -> the upcycled `VishwamAI`
    load_dense        a dense model with its tokenizer from a model, pipeline, HF, pipeline or run directory
"""

import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .config import ModelConfig
from .errors import InvalidTypeError, InvalidValueError
from .model import VishwamAI, abstract_model
from .model_dirs import load_model_dir
from .nn.block import Block
from .nn.mlp import MLP
from .nn.moe import MoE
from .nn.stack import Stage, split_layers, unstack_layers
from .pipeline import VishwamAIPipeline

Source = VishwamAI | VishwamAIPipeline | str | os.PathLike


def upcycle_config(dense: ModelConfig, num_experts: int, experts_per_token: int = 2, *, moe_every: int = 1,
                   first_dense_layers: int = 0, capacity_factor: float | None = None,
                   aux_free_bias: bool = False) -> ModelConfig:
    """The config of the MoE that `dense` upcycles into: `dense` with `num_experts` experts,
    top-`experts_per_token`, MoE in every `moe_every`-th layer after `first_dense_layers`
    dense ones, and the routing fields that make the upcycled model compute the dense
    model's function (see the module docstring). Its balance-loss settings are `dense`'s.
    """
    if dense.is_moe:
        raise InvalidValueError(f"upcycle: the source is already a MoE ({dense.num_experts} experts); upcycling starts "
                                "from a dense model (num_experts=1).")
    if getattr(dense, "mtp_depth", 0):
        raise InvalidValueError(f"upcycle: the source has mtp_depth={dense.mtp_depth} multi-token prediction modules, "
                                "which upcycling does not convert; upcycle a model without them (mtp_depth=0).")
    if not isinstance(num_experts, int) or num_experts < 2:
        raise InvalidValueError(f"upcycle: num_experts must be an integer >= 2, got {num_experts!r}.")
    if not isinstance(experts_per_token, int) or not 1 <= experts_per_token <= num_experts:
        raise InvalidValueError(f"upcycle: experts_per_token must be in [1, num_experts={num_experts}], got "
                                f"{experts_per_token!r}.")
    return dense.replace(
        num_experts=num_experts, experts_per_token=experts_per_token, moe_every=moe_every,
        first_dense_layers=first_dense_layers, capacity_factor=capacity_factor, aux_free_bias=aux_free_bias,
        moe_ffn_dim=None, router_type="softmax", router_renormalize=True, routed_scaling_factor=1.0,
        num_shared_experts=0, shared_expert_ffn_dim=None, shared_expert_gate=False, n_groups=1, topk_groups=1,
    )


def _check_fraction(name: str, value: float, upper: float | None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (upper is not None and value > upper):
        bound = f"[0, {upper}]" if upper is not None else ">= 0"
        raise InvalidValueError(f"upcycle: {name} must be a number {bound}, got {value!r}.")


def _redrawn_neurons(num_experts: int, neurons: int, fraction: float,
                     key: PRNGKeyArray) -> Bool[Array, "experts neurons"]:
    """`[experts, neurons]` booleans: for each expert its own random `fraction` of the MLP's
    inner neurons (True: re-drawn), the same in `gate`, `up` and `down`."""
    count = round(fraction * neurons)
    order = jax.vmap(lambda k: jax.random.permutation(k, neurons))(jax.random.split(key, num_experts))  # (E, F)
    return jnp.zeros((num_experts, neurons), bool).at[jnp.arange(num_experts)[:, None], order[:, :count]].set(True)


def _perturbed_copies(
    weight: Float[Array, "rows cols"],
    redrawn: Bool[Array, "experts neurons"],
    neuron_axis: int,
    *,
    noise: float,
    key: PRNGKeyArray,
) -> Float[Array, "experts rows cols"]:
    """One copy of `weight` per row of `redrawn` (`[experts, neurons]`, `neuron_axis` the
    weight's axis of inner neurons: 1 for `gate`/`up`, 0 for `down`), its `redrawn` neurons
    drawn afresh from `normal(mean(weight), std(weight))`, plus `noise * std(weight)` noise."""
    num_experts = redrawn.shape[0]
    copies = jnp.broadcast_to(weight, (num_experts, *weight.shape))  # (E, rows, cols)
    if noise == 0 and not bool(jnp.any(redrawn)):
        return jnp.array(copies)
    w = weight.astype(jnp.float32)
    mean, std = jnp.mean(w), jnp.std(w)
    k_noise, k_draw = jax.random.split(key)
    mask = redrawn[:, None, :] if neuron_axis == 1 else redrawn[:, :, None]  # (E, 1, F) or (E, F, 1)
    out = jnp.where(mask, mean + std * jax.random.normal(k_draw, copies.shape), copies.astype(jnp.float32))
    if noise > 0:
        out = out + noise * std * jax.random.normal(k_noise, out.shape)
    return out.astype(weight.dtype)


def _upcycled_mlp(mlp: MLP, config: ModelConfig, *, noise: float, reinit_fraction: float, key: PRNGKeyArray) -> MoE:
    """One layer's MoE: a fresh router, every expert a (perturbed) copy of `mlp`."""
    k_layer, k_pick, k_gate, k_up, k_down = jax.random.split(key, 5)
    dtype = mlp.gate_proj.weight.dtype
    template = MoE(
        config.hidden_size, config.expert_ffn_dim, config.num_experts, config.experts_per_token,
        router_type=config.router_type, renormalize=config.router_renormalize, dispatch=config.moe_dispatch,
        capacity_factor=config.capacity_factor, capacity_priority=config.capacity_priority,
        jitter=config.router_jitter, balance_loss=config.load_balance_loss, aux_free_bias=config.aux_free_bias,
        use_fp8=config.fp8 in ("mlp", "all"), fp8_scaling=config.fp8_scaling, fp8_block_size=config.fp8_block_size,
        init_std=config.init_std, dtype=dtype, key=k_layer,
    )
    redrawn = _redrawn_neurons(config.num_experts, config.expert_ffn_dim, reinit_fraction, k_pick)
    experts = eqx.tree_at(
        lambda e: (e.gate, e.up, e.down), template.experts,
        (_perturbed_copies(mlp.gate_proj.weight, redrawn, 1, noise=noise, key=k_gate),
         _perturbed_copies(mlp.up_proj.weight, redrawn, 1, noise=noise, key=k_up),
         _perturbed_copies(mlp.down_proj.weight, redrawn, 0, noise=noise, key=k_down)),
    )
    return eqx.tree_at(lambda m: m.experts, template, experts)


def upcycle_model(dense: VishwamAI, config: ModelConfig, *, noise: float = 0.0, reinit_fraction: float = 0.0,
                  key: PRNGKeyArray) -> VishwamAI:
    """`dense` upcycled into a `VishwamAI` of `config` (from `upcycle_config(dense.config, ...)`).

    Layer `n` of the result has layer `n`'s attention and norms; where `config.layer_is_moe(n)`,
    its MLP becomes a `MoE` whose experts copy that MLP (with `noise` / `reinit_fraction`,
    see the module docstring) under a router drawn from `key`; elsewhere the MLP is kept.
    Eager (call outside jit): holds the dense and the MoE weights at once.
    """
    if not isinstance(dense, VishwamAI):
        raise InvalidTypeError(f"upcycle_model: expected a dense VishwamAI, got {type(dense).__name__}.")
    expected = upcycle_config(dense.config, config.num_experts, config.experts_per_token, moe_every=config.moe_every,
                              first_dense_layers=config.first_dense_layers, capacity_factor=config.capacity_factor,
                              aux_free_bias=config.aux_free_bias)
    if config.diff(expected):
        raise InvalidValueError(f"upcycle_model: config differs from upcycle_config(dense.config, ...) in "
                                f"{config.diff(expected)}; build it with upcycle_config.")
    _check_fraction("noise", noise, None)
    _check_fraction("reinit_fraction", reinit_fraction, 1.0)
    layer_keys = jax.random.split(key, config.num_layers)
    layers = []
    for n, block in enumerate(unstack_layers(dense.stages)):
        if config.layer_is_moe(n):
            moe = _upcycled_mlp(block.mlp, config, noise=noise, reinit_fraction=reinit_fraction, key=layer_keys[n])
            block = eqx.tree_at(lambda b: b.mlp, block, moe)
        layers.append(block)
    # The MoE model's own stages decide which layers share a stack: stage s's block j,
    # repeat r, is the layer at `numbers[s][r, j]`.
    shapes = abstract_model(config).stages
    numbers = split_layers(shapes, jnp.arange(config.num_layers))
    stages = tuple(
        Stage(tuple(_stack([layers[int(n)] for n in layer_numbers[:, j]]) for j in range(len(stage.blocks))),
              stage.repeats)
        for stage, layer_numbers in zip(shapes, numbers, strict=True))
    return eqx.tree_at(lambda m: m.stages, dense, stages).with_config(config)


def _stack(blocks: list[Block]) -> Block:
    """Blocks of one structure -> one block whose arrays carry a leading layer axis."""
    arrays = [eqx.filter(b, eqx.is_array) for b in blocks]
    static = eqx.filter(blocks[0], eqx.is_array, inverse=True)
    return eqx.combine(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *arrays), static)


def load_dense(source: Source, *, dtype: Any = None) -> tuple[VishwamAI, VishwamAIPipeline | None]:
    """The dense model of `source`, and its pipeline when it comes with a tokenizer.

    `source` is a `VishwamAI`, a `VishwamAIPipeline`, or a directory of any kind
    `vishwam.model_dirs.load_model_dir` reads (a transformers checkpoint of Llama, Mistral,
    Qwen2, ...; a pipeline; a run; a `config.json` + `model.safetensors` pair). `dtype` applies
    to transformers checkpoints (see `vishwam.hf.config_from_hf`).
    """
    if isinstance(source, VishwamAIPipeline):
        return source.model, source
    if isinstance(source, VishwamAI):
        return source, None
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidTypeError(f"upcycle: expected a VishwamAI, a VishwamAIPipeline or a directory, got "
                               f"{type(source).__name__}.")
    return load_model_dir(source, dtype=dtype)


def upcycle(source: Source, num_experts: int, experts_per_token: int = 2, *, moe_every: int = 1,
            first_dense_layers: int = 0, capacity_factor: float | None = None, aux_free_bias: bool = False,
            noise: float = 0.0, reinit_fraction: float = 0.0, key: PRNGKeyArray | None = None,
            dtype: Any = None) -> VishwamAI | VishwamAIPipeline:
    """Upcycle a dense Llama / Mistral / Qwen2 (or any dense `VishwamAI`) into a MoE.

    Arguments:
        source: a dense `VishwamAI`, a `VishwamAIPipeline`, or a directory (`load_dense`).
        num_experts: experts per MoE layer, each a copy of the dense MLP.
        experts_per_token: top-k (2 or more, so the router learns from the LM loss).
        moe_every, first_dense_layers: which layers become MoE (`ModelConfig`'s fields;
            default every layer).
        capacity_factor: `None` (dropless: the exact dense function at init, in training too)
            or the capacity dispatch's factor for training.
        aux_free_bias: add DeepSeek's aux-loss-free selection bias (zero at first).
        noise, reinit_fraction: perturb the copies (module docstring); 0 keeps the dense function.
        key: the routers' init and the perturbations (default `jax.random.key(0)`).
        dtype: parameter dtype when reading an HF checkpoint (default: the checkpoint's).

    Returns:
        A `VishwamAIPipeline` (the source's tokenizer, `add_bos` and stop ids) when the source
        has a tokenizer, else the `VishwamAI`. `pipeline.save(dir)` writes what
        `vishwam-train --init-from dir` continues training.
    """
    _check_fraction("noise", noise, None)  # before any weight is read
    _check_fraction("reinit_fraction", reinit_fraction, 1.0)
    dense, pipeline = load_dense(source, dtype=dtype)
    config = upcycle_config(dense.config, num_experts, experts_per_token, moe_every=moe_every,
                            first_dense_layers=first_dense_layers, capacity_factor=capacity_factor,
                            aux_free_bias=aux_free_bias)
    model = upcycle_model(dense, config, noise=noise, reinit_fraction=reinit_fraction,
                          key=jax.random.key(0) if key is None else key)
    if pipeline is None:
        return model
    return VishwamAIPipeline(model, pipeline.tokenizer, add_bos=pipeline.add_bos, eos_ids=pipeline.eos_ids)
