"""The map between vishwam's array leaves and the tensors of an HF checkpoint:

    HF name (layer N)                                HF shape   vishwam leaf                     shape
    model.embed_tokens.weight                        [V, D]     embed                            [V, D]
    model.layers.N.input_layernorm.weight            [D]        stages.*.attn_norm.scale         [L, D]
    model.layers.N.self_attn.{q,k,v,o}_proj.weight   [out, in]  stages.*.attn.{q,k,v,o}_proj     [L, in, out]
    model.layers.N.self_attn.{q,k,v}_proj.bias       [out]      stages.*.attn.{q,k,v}_proj.bias  [L, out]
    model.layers.N.self_attn.{q,k}_norm.weight       [n]        stages.*.attn.{q,k}_norm.scale   [L, n]
    model.layers.N.post_attention_layernorm.weight   [D]        stages.*.mlp_norm.scale          [L, D]
    model.layers.N.mlp.{gate,up,down}_proj.weight    [out, in]  stages.*.mlp.{gate,up,down}_proj [L, in, out]
    the family's router (`Family.router`)            [X, D]     stages.*.mlp.router              [L, D, X]
    the family's experts (`Family.experts`)          [out, in]  stages.*.mlp.experts.*           [L, X, in, out]
    the family's own (`Family.tensors`)              the family's, e.g. Qwen2-MoE's shared expert
    model.norm.weight                                [D]        final_norm.scale                 [D]
    model.layers.{L+k}.{enorm,hnorm}.weight          [D]        mtp.k.{enorm,hnorm}.scale        [D]
    model.layers.{L+k}.eh_proj.weight                [D, 2D]    mtp.k.eh_proj.weight             [2D, D]
    model.layers.{L+k}.shared_head.norm.weight       [D]        mtp.k.norm.scale                 [D]
    model.layers.{L+k}.<a layer's tensors>                      mtp.k.block.*  (no repeats axis)
    model.layers.{L+k}.embed_tokens.weight,          copies of embed and lm_head.weight (written, not read)
      model.layers.{L+k}.shared_head.head.weight
    lm_head.weight (absent when tied)                [V, D]     lm_head.weight                   [D, V]

The `mtp.k` rows (multi-token prediction, `L` = `num_hidden_layers`) only for a family with
`Family.mtp` (DeepSeek-V3). Otherwise `L` is the scanned `repeats` axis of a stage: HF layer N is repeat r of block j of stage s,
N = the stage's first layer (`vishwam.nn.stack.stage_offsets`) + r * blocks + j.
"""

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax

from ..arrays import is_array_like
from ..errors import InvalidValueError
from ..nn.stack import stage_offsets
from ..parallel.sharding import path_string
from .families import Family


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One HF tensor: the slice `index` of the vishwam leaf at `leaf` (dotted path),
    transposed when `transpose` (HF `[out, in]` vs vishwam `[in, out]`)."""

    name: str
    shape: tuple[int, ...]
    leaf: str
    index: tuple[int, ...]
    transpose: bool


# Block-relative leaf -> (HF name within `model.layers.N.`, transposed?); the MoE leaves are the family's.
_BLOCK_TENSORS = {
    "attn_norm.scale": ("input_layernorm.weight", False),
    "attn.q_proj.weight": ("self_attn.q_proj.weight", True),
    "attn.k_proj.weight": ("self_attn.k_proj.weight", True),
    "attn.v_proj.weight": ("self_attn.v_proj.weight", True),
    "attn.o_proj.weight": ("self_attn.o_proj.weight", True),
    "attn.q_proj.bias": ("self_attn.q_proj.bias", False),
    "attn.k_proj.bias": ("self_attn.k_proj.bias", False),
    "attn.v_proj.bias": ("self_attn.v_proj.bias", False),
    "attn.q_norm.scale": ("self_attn.q_norm.weight", False),
    "attn.k_norm.scale": ("self_attn.k_norm.weight", False),
    "mlp_norm.scale": ("post_attention_layernorm.weight", False),
    "mlp.gate_proj.weight": ("mlp.gate_proj.weight", True),
    "mlp.up_proj.weight": ("mlp.up_proj.weight", True),
    "mlp.down_proj.weight": ("mlp.down_proj.weight", True),
}
_TOP_TENSORS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm.scale": ("model.norm.weight", False),
    "lm_head.weight": ("lm_head.weight", True),
}
_STAGE_LEAF = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
# A multi-token prediction module's own leaves -> (HF name within its layer, transposed?).
_MTP_TENSORS = {
    "enorm.scale": ("enorm.weight", False),
    "hnorm.scale": ("hnorm.weight", False),
    "eh_proj.weight": ("eh_proj.weight", True),
    "norm.scale": ("shared_head.norm.weight", False),
}
_MTP_LEAF = re.compile(r"^mtp\.(\d+)\.(.+)$")


def _leaf_paths(tree) -> Iterator[tuple[str, Any]]:
    for path, leaf in jax.tree_util.tree_flatten_with_path(eqx.filter(tree, is_array_like))[0]:
        yield path_string(path), leaf


def _tensor_map(model, family: Family, *, mtp_copies: bool = False) -> list[_Piece]:
    """Every HF tensor of `model` (concrete or abstract) as `family` names it, in
    transformers' order: embedding, layer by layer, final norm, head. `mtp_copies` (export)
    adds the copies of the embedding and the head DeepSeek stores in each multi-token
    prediction layer (`embed_tokens`, `shared_head.head`; a loader skips them)."""
    layers: dict[int, list[_Piece]] = {}
    top: list[_Piece] = []
    offsets = stage_offsets(model.stages)
    block_tensors = {**_BLOCK_TENSORS, **family.tensors,
                     **({"mlp.router": (family.router, True)} if family.router else {})}
    for path, leaf in _leaf_paths(model):
        shape = tuple(leaf.shape)
        if path in _TOP_TENSORS:
            name, transpose = _TOP_TENSORS[path]
            top.append(_Piece(name, shape[::-1] if transpose else shape, path, (), transpose))
            continue
        mtp = _MTP_LEAF.match(path) if family.mtp else None
        if mtp is not None:
            n = model.config.num_layers + int(mtp.group(1))
            layers.setdefault(n, []).extend(_mtp_pieces(path, shape, mtp.group(2), n, block_tensors, family))
            continue
        match = _STAGE_LEAF.match(path)
        rel = match.group(3) if match else None
        if rel not in block_tensors and rel not in family.experts:
            raise InvalidValueError(f"HF export: the vishwam leaf {path} {list(shape)} has no HF {family.name} tensor.")
        s, j = int(match.group(1)), int(match.group(2))
        stage = model.stages[s]
        for r in range(stage.repeats):
            n = offsets[s] + r * len(stage.blocks) + j
            if rel in block_tensors:
                name, transpose = block_tensors[rel]
                inner = shape[1:]
                layers.setdefault(n, []).append(_Piece(f"model.layers.{n}.{name}",
                                                       inner[::-1] if transpose else inner, path, (r,), transpose))
            else:
                inner = shape[2:]
                for e in range(shape[1]):
                    name = f"model.layers.{n}.{family.experts[rel].format(e=e)}"
                    layers.setdefault(n, []).append(_Piece(name, inner[::-1], path, (r, e), True))
    first = [p for p in top if p.name == "model.embed_tokens.weight"]
    last = [p for name in ("model.norm.weight", "lm_head.weight") for p in top if p.name == name]
    if mtp_copies and family.mtp:
        (embed,) = first
        head = next((p for p in last if p.name == "lm_head.weight"), embed)  # tied: the embedding
        for k in range(model.config.mtp_depth):
            n = model.config.num_layers + k
            layers[n] += [dataclasses.replace(embed, name=f"model.layers.{n}.embed_tokens.weight"),
                          dataclasses.replace(head, name=f"model.layers.{n}.shared_head.head.weight")]
    return first + [p for n in sorted(layers) for p in layers[n]] + last


def _mtp_pieces(path: str, shape: tuple[int, ...], rel: str, n: int, block_tensors, family: Family) -> list[_Piece]:
    """The HF tensors of one leaf of a multi-token prediction module stored as layer `n`."""
    inner = rel.removeprefix("block.")
    if rel in _MTP_TENSORS or (rel.startswith("block.") and inner in block_tensors):
        name, transpose = _MTP_TENSORS.get(rel) or block_tensors[inner]
        return [_Piece(f"model.layers.{n}.{name}", shape[::-1] if transpose else shape, path, (), transpose)]
    if rel.startswith("block.") and inner in family.experts:
        return [_Piece(f"model.layers.{n}.{family.experts[inner].format(e=e)}", shape[1:][::-1], path, (e,), True)
                for e in range(shape[0])]
    raise InvalidValueError(f"HF export: the vishwam leaf {path} {list(shape)} has no HF {family.name} tensor.")
