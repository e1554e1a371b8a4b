"""HuggingFace interop: Llama, Mistral, Qwen2 and Mixtral safetensors checkpoints in and
out, and their tokenizers.

`load_hf_checkpoint(directory)` reads a transformers directory (`config.json` plus
`model.safetensors`, or shards listed in `model.safetensors.index.json`) of a
`LlamaForCausalLM` (dense, GQA), `MistralForCausalLM` (dense, sliding-window
attention), `Qwen2ForCausalLM` (dense, q/k/v biases) or `MixtralForCausalLM` (MoE)
and returns an equivalent `VishwamAI` and its `ModelConfig`; `save_hf_checkpoint`
writes one back that transformers loads. The arithmetic already matches: RMSNorm,
rotate-half RoPE, GQA, SwiGLU, Mistral's window (`ModelConfig.sliding_window`), and
Mixtral's routing (softmax over the router logits, top-k, weights renormalised to sum
to one). Only the layouts differ:

    HF name (layer N, expert E)                      HF shape   vishwam leaf                    shape
    model.embed_tokens.weight                        [V, D]     embed                           [V, D]
    model.layers.N.input_layernorm.weight            [D]        stages.*.attn_norm.scale        [L, D]
    model.layers.N.self_attn.{q,k,v,o}_proj.weight   [out, in]  stages.*.attn.{q,k,v,o}_proj    [L, in, out]
    model.layers.N.self_attn.{q,k,v}_proj.bias (Qwen2) [out]    stages.*.attn.{q,k,v}_proj.bias [L, out]
    model.layers.N.post_attention_layernorm.weight   [D]        stages.*.mlp_norm.scale         [L, D]
    model.layers.N.mlp.{gate,up,down}_proj.weight    [out, in]  stages.*.mlp.{gate,up,down}_proj [L, in, out]
    model.layers.N.block_sparse_moe.gate.weight      [X, D]     stages.*.mlp.router             [L, D, X]
    ...block_sparse_moe.experts.E.{w1,w3}.weight     [F, D]     stages.*.mlp.experts.{gate,up}  [L, X, D, F]
    ...block_sparse_moe.experts.E.w2.weight          [D, F]     stages.*.mlp.experts.down       [L, X, F, D]
    model.norm.weight                                [D]        final_norm.scale                [D]
    lm_head.weight (absent when tied)                [V, D]     lm_head.weight                  [D, V]

(`L` is the scanned `repeats` axis of a stage; every layer of these
checkpoints lives in one stage.) Tensors are read one at a time through `safe_open`
into preallocated stacked arrays, so the file is never held in memory twice, and
go straight onto a mesh when one is given. No pickle: `.bin` checkpoints are refused.
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import ModelConfig
from .files import atomic_write_bytes, read_json_object
from .model import VishwamAI
from .parallel.sharding import path_string

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                           "MixtralForCausalLM": "mixtral"}

# transformers' own defaults for fields a config.json may leave out.
_DEFAULTS = {
    "llama": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32,
                "sliding_window": 4096},
    "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32,
                "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0},
}
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}
_FLOAT_TENSOR_DTYPES = ("F16", "BF16", "F32", "F64")
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# Buffers that old transformers versions saved; recomputed, never needed.
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What earlier saves may have left (replaced by a new save): `model.safetensors`, shards, index.
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")
# The safetensors header metadata transformers requires of a PyTorch checkpoint.
_METADATA = {"format": "pt"}
# Token ids of `VishwamAITokenizer` (fixed by its format), written into config.json.
DEFAULT_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}

PartitionFn = Callable[[str, tuple[int, ...]], PartitionSpec]


# ---------------------------------------------------------------------- config
def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = None) -> ModelConfig:
    """The `ModelConfig` of a transformers `config.json` (as a dict).

    Arguments:
        hf: the parsed `config.json` of a `LlamaForCausalLM` or `MixtralForCausalLM`.
        dtype: parameter and compute dtype (`"float32"`, `"bfloat16"`, `"float16"`
            or a numpy/jax dtype); `None` keeps the checkpoint's `dtype`/`torch_dtype`
            (float32 if it names none).

    Mixtral becomes `moe_dispatch="auto"` with `capacity_factor=None` (dropless, like
    Mixtral: `grouped` on CPU, `ragged` on GPU/TPU) and no router z-loss (Mixtral has
    none). Mistral's and Mixtral's `sliding_window` becomes `ModelConfig.sliding_window`
    (`None` when it is at least `max_position_embeddings`, where it hides nothing); Qwen2
    gets `qkv_bias=True`, and its per-layer windows (`use_sliding_window=true`) are refused.
    """
    family = _family(hf)
    defaults = _DEFAULTS[family]

    def get(name):
        value = hf.get(name)
        return defaults.get(name) if value is None else value

    missing = [name for name in _SHAPE_FIELDS if hf.get(name) is None]
    if missing:
        raise ValueError(f"HF config: {missing} missing; a {family} config.json must give {list(_SHAPE_FIELDS)}.")
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (vishwam's MLPs are SwiGLU: 'silu')")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            unsupported.append(f"{name}=true (vishwam's projections have no bias but Qwen2's q/k/v ones)")
    if family == "qwen2" and hf.get("use_sliding_window"):
        unsupported.append("use_sliding_window=true (Qwen2's windows on some layers only; vishwam has one window "
                           "for every layer)")
    if unsupported:
        raise ValueError(f"HF config: unsupported {'; '.join(unsupported)}.")

    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads == hf["hidden_size"]:
        head_dim = None  # the default: keeps the config equal to one built by hand
    max_seq_len = get("max_position_embeddings")
    # An explicit null means no window; Mistral's default (absent) is 4096, as in transformers.
    window = hf.get("sliding_window", defaults.get("sliding_window")) if family in ("mistral", "mixtral") else None
    if window is not None and window >= max_seq_len:
        window = None
    dtype_name = _dtype_name((hf.get("dtype") or hf.get("torch_dtype") or "float32") if dtype is None else dtype)
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads"), head_dim=head_dim,
        ffn_dim=hf["intermediate_size"], norm_type="rms", norm_eps=float(get("rms_norm_eps")),
        rope_theta=_rope_theta(hf, defaults["rope_theta"]), max_seq_len=max_seq_len,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), param_dtype=dtype_name, compute_dtype=dtype_name,
        sliding_window=window, qkv_bias=family == "qwen2",
    )
    if family != "mixtral":
        fields.update(num_experts=1, experts_per_token=1)
    else:
        if not isinstance(hf.get("num_local_experts"), int) or hf["num_local_experts"] < 2:
            raise ValueError(f"HF config: a mixtral config.json must give num_local_experts >= 2, got "
                             f"{hf.get('num_local_experts')!r}.")
        fields.update(
            num_experts=hf["num_local_experts"], experts_per_token=get("num_experts_per_tok"),
            router_type="softmax", router_renormalize=True, moe_dispatch="auto", capacity_factor=None,
            router_aux_loss_coef=float(get("router_aux_loss_coef")), router_z_loss_coef=0.0,
            router_jitter=float(get("router_jitter_noise")),
        )
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig, *, token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The transformers `config.json` (as a dict) of a model with `config`.

    MoE configs become `MixtralForCausalLM`; dense ones `Qwen2ForCausalLM` with
    `qkv_bias`, `MistralForCausalLM` with a `sliding_window`, else `LlamaForCausalLM`.
    Raises `ValueError` listing every feature the architecture lacks.
    `token_ids` (`pad_token_id`, `bos_token_id`, `eos_token_id`) default to
    `VishwamAITokenizer`'s fixed ids.
    """
    _check_exportable(config)
    family = ("mixtral" if config.is_moe else "qwen2" if config.qkv_bias
              else "mistral" if config.sliding_window is not None else "llama")
    architecture = {name: arch for arch, name in SUPPORTED_ARCHITECTURES.items()}[family]
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        # Top-level rope_theta with rope_scaling null is read the same by transformers 4 and 5.
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": config.param_dtype,
        "use_cache": True,
        **DEFAULT_TOKEN_IDS,
        **(token_ids or {}),
    }
    if config.is_moe:
        hf.update(num_local_experts=config.num_experts, num_experts_per_tok=config.experts_per_token,
                  router_aux_loss_coef=config.router_aux_loss_coef, router_jitter_noise=config.router_jitter,
                  output_router_logits=False, sliding_window=config.sliding_window)
    elif family == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif family == "mistral":
        hf.update(sliding_window=config.sliding_window)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    return hf


def _family(hf: Mapping[str, Any]) -> str:
    architectures = hf.get("architectures") or []
    known = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if known:
        return SUPPORTED_ARCHITECTURES[known[0]]
    if not architectures and hf.get("model_type") in SUPPORTED_ARCHITECTURES.values():
        return hf["model_type"]
    raise ValueError(
        f"HF config: unsupported architecture {architectures or hf.get('model_type')!r}; vishwam reads "
        f"{sorted(SUPPORTED_ARCHITECTURES)} checkpoints."
    )


def _rope_theta(hf: Mapping[str, Any], default: float) -> float:
    """`rope_theta` from the top level or from transformers 5's `rope_parameters`;
    any RoPE scaling other than the default rotary embedding is refused."""
    params = hf.get("rope_parameters")
    scaling = params if params is not None else hf.get("rope_scaling")
    rope_type = "default"
    if scaling is not None:
        if not isinstance(scaling, Mapping):
            raise ValueError(f"HF config: rope_parameters/rope_scaling must be an object, got {scaling!r}.")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"HF config: RoPE type {rope_type!r} ({scaling}) is not implemented; vishwam implements only the "
            "default rotary embedding ('default', no scaling). Use a checkpoint without RoPE scaling."
        )
    theta = (params or {}).get("rope_theta", hf.get("rope_theta"))
    return float(default if theta is None else theta)


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        if dtype in _DTYPE_NAMES:
            return _DTYPE_NAMES[dtype]
    else:
        name = jnp.dtype(dtype).name
        if name in _DTYPE_NAMES:
            return name
    raise ValueError(f"Unsupported dtype {dtype!r}; choose 'float32', 'bfloat16' or 'float16'.")


def _check_exportable(config: ModelConfig) -> None:
    problems = []
    if config.qkv_bias and (config.is_moe or config.sliding_window is not None):
        problems.append("qkv_bias=True with MoE or a sliding_window (only Qwen2, dense and windowless, has q/k/v "
                        "biases)")
    if config.norm_type != "rms":
        problems.append(f"norm_type={config.norm_type!r} (HF Llama/Mixtral use RMSNorm: 'rms')")
    if config.is_moe:
        if config.first_dense_layers or config.moe_every != 1:
            problems.append(f"first_dense_layers={config.first_dense_layers}, moe_every={config.moe_every} "
                            "(every Mixtral layer is MoE: 0 and 1)")
        if config.num_shared_experts:
            problems.append(f"num_shared_experts={config.num_shared_experts} (Mixtral has none)")
        if config.router_type != "softmax" or not config.router_renormalize:
            problems.append(f"router_type={config.router_type!r}, router_renormalize={config.router_renormalize} "
                            "(Mixtral routes by softmax and renormalises the top-k weights)")
        if config.aux_free_bias:
            problems.append("aux_free_bias=True (Mixtral has no selection bias)")
    if problems:
        raise ValueError(f"save_hf_checkpoint: the config has features no HF Llama/Mistral/Qwen2/Mixtral has: "
                         f"{'; '.join(problems)}.")


# ------------------------------------------------------------------- tensor map
@dataclasses.dataclass(frozen=True)
class _Piece:
    """One HF tensor: the slice `index` of the vishwam leaf at `leaf` (dotted path),
    transposed when `transpose` (HF `[out, in]` vs vishwam `[in, out]`)."""

    name: str
    shape: tuple[int, ...]
    leaf: str
    index: tuple[int, ...]
    transpose: bool


# Block-relative leaf -> (HF name within `model.layers.N.`, transposed?)
_BLOCK_TENSORS = {
    "attn_norm.scale": ("input_layernorm.weight", False),
    "attn.q_proj.weight": ("self_attn.q_proj.weight", True),
    "attn.k_proj.weight": ("self_attn.k_proj.weight", True),
    "attn.v_proj.weight": ("self_attn.v_proj.weight", True),
    "attn.o_proj.weight": ("self_attn.o_proj.weight", True),
    "attn.q_proj.bias": ("self_attn.q_proj.bias", False),
    "attn.k_proj.bias": ("self_attn.k_proj.bias", False),
    "attn.v_proj.bias": ("self_attn.v_proj.bias", False),
    "mlp_norm.scale": ("post_attention_layernorm.weight", False),
    "mlp.gate_proj.weight": ("mlp.gate_proj.weight", True),
    "mlp.up_proj.weight": ("mlp.up_proj.weight", True),
    "mlp.down_proj.weight": ("mlp.down_proj.weight", True),
    "mlp.router": ("block_sparse_moe.gate.weight", True),
}
_EXPERT_TENSORS = {"mlp.experts.gate": "w1", "mlp.experts.up": "w3", "mlp.experts.down": "w2"}
_TOP_TENSORS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm.scale": ("model.norm.weight", False),
    "lm_head.weight": ("lm_head.weight", True),
}
_STAGE_LEAF = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")


def _leaf_paths(tree) -> Iterator[tuple[str, Any]]:
    for path, leaf in jax.tree_util.tree_flatten_with_path(eqx.filter(tree, _is_array_like))[0]:
        yield path_string(path), leaf


def _is_array_like(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray))


def _tensor_map(model) -> list[_Piece]:
    """Every HF tensor of `model` (concrete or abstract), in transformers' order:
    embedding, layer by layer, final norm, head."""
    layers: dict[int, list[_Piece]] = {}
    top: list[_Piece] = []
    offsets, offset = [], 0
    for stage in model.stages:
        offsets.append(offset)
        offset += stage.repeats * len(stage.blocks)
    for path, leaf in _leaf_paths(model):
        shape = tuple(leaf.shape)
        if path in _TOP_TENSORS:
            name, transpose = _TOP_TENSORS[path]
            top.append(_Piece(name, shape[::-1] if transpose else shape, path, (), transpose))
            continue
        match = _STAGE_LEAF.match(path)
        rel = match.group(3) if match else None
        if rel not in _BLOCK_TENSORS and rel not in _EXPERT_TENSORS:
            raise ValueError(f"HF export: the vishwam leaf {path} {list(shape)} has no HF Llama/Mixtral tensor.")
        s, j = int(match.group(1)), int(match.group(2))
        stage = model.stages[s]
        for r in range(stage.repeats):
            n = offsets[s] + r * len(stage.blocks) + j
            if rel in _BLOCK_TENSORS:
                name, transpose = _BLOCK_TENSORS[rel]
                inner = shape[1:]
                layers.setdefault(n, []).append(_Piece(f"model.layers.{n}.{name}",
                                                       inner[::-1] if transpose else inner, path, (r,), transpose))
            else:
                inner = shape[2:]
                for e in range(shape[1]):
                    name = f"model.layers.{n}.block_sparse_moe.experts.{e}.{_EXPERT_TENSORS[rel]}.weight"
                    layers.setdefault(n, []).append(_Piece(name, inner[::-1], path, (r, e), True))
    first = [p for p in top if p.name == "model.embed_tokens.weight"]
    last = [p for name in ("model.norm.weight", "lm_head.weight") for p in top if p.name == name]
    return first + [p for n in sorted(layers) for p in layers[n]] + last


# ------------------------------------------------------------------------ files
class _Checkpoint:
    """The tensors of an HF directory: one `model.safetensors` or the shards of
    `model.safetensors.index.json`, opened lazily with `safe_open` (numpy)."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.folder = folder
        self._stack = stack
        self._handles: dict[Path, Any] = {}
        single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
        if single.is_file():
            self.files = {name: single for name in self._open(single).keys()}
        elif index.is_file():
            self.files = self._read_index(index)
        else:
            self.files = {}
            _refuse_missing_weights(folder)

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {error!r}.") from None
        files = {name: self.folder / file for name, file in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) {absent} that are not in {self.folder}; copy them too.")
        for shard in sorted(set(files.values())):
            stored = set(self._open(shard).keys())
            listed = sorted(name for name, p in files.items() if p == shard and name not in stored)
            if listed:
                raise ValueError(f"{index} maps {listed[:8]} to {shard.name}, which does not hold them; "
                                 "the index and the shards are from different saves.")
        return files

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import SafetensorError, safe_open

            try:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            except SafetensorError as error:
                raise ValueError(f"{path} is not a readable safetensors file ({error}); it is truncated or of "
                                 "another format: copy it again.") from None
        return self._handles[path]

    def describe(self, name: str) -> tuple[tuple[int, ...], str]:
        tensor = self._open(self.files[name]).get_slice(name)
        return tuple(tensor.get_shape()), tensor.get_dtype()

    def read(self, name: str) -> np.ndarray:
        return self._open(self.files[name]).get_tensor(name)


def _refuse_missing_weights(folder: Path) -> None:
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{folder} holds only pickled PyTorch weights {pickled[:4]}; vishwam never unpickles (a pickle can "
            "run arbitrary code). Convert them to safetensors first, e.g. in transformers: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)`."
        )
    loose = sorted(p.name for p in folder.glob("*.safetensors"))
    if loose:
        raise FileNotFoundError(f"{folder} has safetensors shards {loose[:4]} but no {INDEX_FILE} mapping tensors "
                                "to them; copy the index file too.")
    raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE} or {INDEX_FILE}: not a safetensors HF checkpoint.")


def is_hf_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` looks like a transformers checkpoint (its config.json names an
    architecture or a model_type), as opposed to a vishwam directory (whose config.json
    is a `ModelConfig`). For CLIs that accept either, e.g. a distillation teacher."""
    path = Path(directory) / CONFIG_FILE
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(hf, dict) and ("architectures" in hf or "model_type" in hf)


def _read_hf_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"load_hf_checkpoint: {folder} is not a directory.")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"load_hf_checkpoint: {path} not found; an HF checkpoint directory has a config.json.")
    return read_json_object(path)


# ------------------------------------------------------------------------- load
def load_hf_checkpoint(
    directory: str | os.PathLike,
    *,
    dtype: Any = None,
    mesh: Mesh | None = None,
    partition: PartitionFn | None = None,
    progress: bool = False,
) -> tuple[VishwamAI, ModelConfig]:
    """Load a transformers Llama, Mistral, Qwen2 or Mixtral safetensors checkpoint.

    Arguments:
        directory: holds `config.json` and `model.safetensors` (or the shards of
            `model.safetensors.index.json`).
        dtype: dtype of the parameters and of the computation (see `config_from_hf`);
            `None` keeps the checkpoint's. The MoE router stays fp32, as in any `VishwamAI`.
        mesh: place every parameter on this mesh as it is read (`NamedSharding`).
        partition: `partition(path, shape) -> PartitionSpec` for each vishwam leaf
            (dotted path, e.g. `stages.0.blocks.0.attn.q_proj.weight`); default
            `vishwam.parallel.sharding.partition_spec` with its `DEFAULT_RULES`.
            Only used with `mesh`.
        progress: a tqdm bar on stderr over the bytes of the tensors read.

    Returns:
        `(model, config)`. To run it another way (MoE dispatch, remat, attention
        backend), use `model.with_config(config.replace(...))`.

    Raises:
        ValueError: an unsupported architecture or RoPE scaling; missing, unexpected
            or mis-shaped tensors (each named, with the shape expected); `.bin` weights.
        FileNotFoundError: no config.json, no weights, or a shard the index lists.
    """
    folder = Path(directory)
    config = config_from_hf(_read_hf_config(folder), dtype=dtype)
    abstract = eqx.filter_eval_shape(VishwamAI, config, key=jax.random.key(0))
    pieces = _tensor_map(abstract)
    if mesh is not None and partition is None:
        from .parallel.sharding import partition_spec

        def partition(path, shape):
            return partition_spec(path, shape, mesh)

    with ExitStack() as stack:
        checkpoint = _Checkpoint(folder, stack)
        _check_tensors(checkpoint, pieces, config)
        by_leaf: dict[str, list[_Piece]] = {}
        for piece in pieces:
            by_leaf.setdefault(piece.leaf, []).append(piece)
        stored = [checkpoint.describe(p.name) for p in pieces]
        total = sum(int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype] for shape, dtype in stored)
        bar = _bytes_bar(progress, "reading tensors", total)
        stack.callback(bar.close)
        arrays = []
        for path, leaf in _leaf_paths(abstract):
            host = np.empty(leaf.shape, leaf.dtype)
            for piece in by_leaf[path]:
                tensor = checkpoint.read(piece.name)
                host[piece.index] = tensor.T if piece.transpose else tensor
                bar.update(tensor.nbytes)
                del tensor
            if mesh is None:
                arrays.append(jnp.asarray(host))
            else:
                arrays.append(jax.device_put(host, NamedSharding(mesh, partition(path, leaf.shape))))
            del host
    params, static = eqx.partition(abstract, _is_array_like)
    treedef = jax.tree_util.tree_structure(params)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, arrays), static), config


def _check_tensors(checkpoint: _Checkpoint, pieces: list[_Piece], config: ModelConfig) -> None:
    """Every expected tensor present with its shape and a float dtype, nothing else
    (before any data is read). `lm_head.weight` next to a tied embedding is allowed
    only if it equals the embedding."""
    expected = {p.name: p.shape for p in pieces}
    present = set(checkpoint.files)
    problems = []
    for name in sorted(set(expected) - present, key=_natural):
        problems.append(f"missing {name} (expected shape {list(expected[name])})")
    extra = sorted(present - set(expected), key=_natural)
    if config.tie_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")
        _check_tied_head(checkpoint)
    for name in extra:
        if not _IGNORED.search(name):
            problems.append(f"unexpected {name} {list(checkpoint.describe(name)[0])}")
    for name in sorted(set(expected) & present, key=_natural):
        shape, dtype = checkpoint.describe(name)
        if shape != expected[name]:
            problems.append(f"{name} has shape {list(shape)}, expected {list(expected[name])}")
        elif dtype not in _FLOAT_TENSOR_DTYPES:
            problems.append(f"{name} has dtype {dtype}, expected a float ({', '.join(_FLOAT_TENSOR_DTYPES)})")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(
            f"load_hf_checkpoint: the tensors in {checkpoint.folder} do not fit its config.json "
            f"({config.num_layers} layers, hidden {config.hidden_size}, experts {config.num_experts}):\n  {shown}"
        )


def _check_tied_head(checkpoint: _Checkpoint) -> None:
    if not np.array_equal(checkpoint.read("lm_head.weight"), checkpoint.read("model.embed_tokens.weight")):
        raise ValueError(
            f"load_hf_checkpoint: {checkpoint.folder} says tie_word_embeddings=true, but its lm_head.weight differs "
            "from model.embed_tokens.weight; set tie_word_embeddings to false in config.json."
        )


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------- save
def save_hf_checkpoint(
    model: VishwamAI,
    config: ModelConfig,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    token_ids: Mapping[str, int] | None = None,
    progress: bool = False,
) -> list[Path]:
    """Write `model` as a transformers checkpoint (`config.json` + safetensors).

    Arguments:
        model: the model; `config` must equal `model.config`.
        directory: created if needed; earlier `model*.safetensors` files and index
            there are replaced, other files (a tokenizer) are kept.
        max_shard_size: bytes (or `"500MB"`, `"2GB"`, `"1GiB"`) per shard; larger
            checkpoints are split into `model-0000i-of-0000n.safetensors` with a
            `model.safetensors.index.json`. `None` writes one file.
        token_ids: `pad/bos/eos_token_id` for config.json (default `DEFAULT_TOKEN_IDS`).
        progress: a tqdm bar on stderr over the bytes of the tensors written.

    Every tensor is saved in its own parameter dtype, so `load_hf_checkpoint` gives
    back the same arrays. Each file is written to a temporary name and renamed.

    Returns:
        The files written.
    """
    if config != model.config:
        raise ValueError(f"save_hf_checkpoint: `config` differs from model.config in {config.diff(model.config)} "
                         "(given, model); pass model.config.")
    hf = config_to_hf(config, token_ids=token_ids)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = _tensor_map(model)
    leaves = dict(_leaf_paths(model))
    limit = _parse_size(max_shard_size)
    shards = _plan_shards(pieces, leaves, limit)
    names = ([WEIGHTS_FILE] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    written = []
    from safetensors.numpy import save

    host: dict[str, np.ndarray] = {}  # each leaf copied to the host once (a no-op on CPU)
    bar = _bytes_bar(progress, "writing tensors", sum(_nbytes(p, leaves) for p in pieces))
    for file, shard in zip(names, shards):
        tensors = {}
        for piece in shard:
            if piece.leaf not in host:
                host[piece.leaf] = np.asarray(leaves[piece.leaf])
            value = host[piece.leaf][piece.index]
            tensors[piece.name] = np.ascontiguousarray(value.T if piece.transpose else value)
        written.append(atomic_write_bytes(folder / file, save(tensors, metadata=_METADATA)))
        bar.update(sum(t.nbytes for t in tensors.values()))
        del tensors
    bar.close()
    if len(shards) > 1:
        weight_map = {p.name: file for file, shard in zip(names, shards) for p in shard}
        total = sum(_nbytes(p, leaves) for p in pieces)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        written.append(atomic_write_bytes(folder / INDEX_FILE, _json_bytes(index)))
    for stale in folder.iterdir():
        if _WEIGHT_FILE.match(stale.name) and stale not in written:
            stale.unlink()
    written.append(atomic_write_bytes(folder / CONFIG_FILE, _json_bytes(hf)))
    return written


def _bytes_bar(progress: bool, desc: str, total: int):
    """A tqdm bar over bytes on stderr (disabled, and free, when `progress` is False)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True, disable=not progress)


def _nbytes(piece: _Piece, leaves: Mapping[str, Any]) -> int:
    return int(np.prod(piece.shape, dtype=np.int64)) * np.dtype(leaves[piece.leaf].dtype).itemsize


def _plan_shards(pieces: list[_Piece], leaves: Mapping[str, Any], limit: int | None) -> list[list[_Piece]]:
    """Consecutive runs of tensors of at most `limit` bytes (a bigger tensor alone)."""
    if limit is None:
        return [pieces]
    shards: list[list[_Piece]] = [[]]
    size = 0
    for piece in pieces:
        n = _nbytes(piece, leaves)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(piece)
        size += n
    return shards


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size: int | str | None) -> int | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", size) if isinstance(size, str) else None
    if match and match.group(2).upper() in _UNITS and int(match.group(1)) > 0:
        return int(match.group(1)) * _UNITS[match.group(2).upper()]
    raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '500MB' or '2GiB', "
                     f"got {size!r}.")


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


# -------------------------------------------------------------- tokenizer, pipeline
def load_hf_tokenizer(directory: str | os.PathLike, **kwargs: Any):
    """The tokenizer of an HF directory: a `VishwamAITokenizer` over its SentencePiece
    `tokenizer.model` (Llama, Mistral, TinyLlama), or a `JsonTokenizer` over its
    `tokenizer.json` (Llama 3, Qwen, GPT-2 style BPE) when there is no usable
    `tokenizer.model`. Either gives the ids transformers' `AutoTokenizer` gives for the
    same files: a `tokenizer.model` is read with the `prepend_scheme` of
    `vishwam.tokenizer.hf_prepend_scheme` (transformers' `LlamaTokenizer` rules, from
    `legacy` and `add_prefix_space`; a text that begins with a space gets no extra one,
    and decoding drops one leading space), except for files `VishwamAITokenizer.save_pretrained`
    wrote, which load as the tokenizer that wrote them.

    The special tokens, `add_bos_token`/`add_eos_token` and `model_max_length` come from
    `tokenizer_config.json` and `special_tokens_map.json`; a pad, BOS or EOS those files
    leave out is taken from the ids of `generation_config.json` (the first of an
    `eos_token_id` list: the others are stop ids, see `load_hf_pipeline`). `kwargs`
    override all of them.
    """
    from .tokenizer import VishwamAITokenizer, hf_prepend_scheme, pretrained_settings
    from .tokenizer_json import JsonTokenizer

    folder = Path(directory)
    sp_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
    if not sp_file.is_file() and not json_file.is_file():
        found = sorted(p.name for p in folder.glob("tokenizer*")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"load_hf_tokenizer: {folder} has neither a SentencePiece tokenizer.model nor a tokenizer.json "
            f"(found {found}); copy the tokenizer files of the checkpoint too."
        )
    generation = _generation_config(folder)
    refusal = None
    if sp_file.is_file():
        try:
            settings = _with_generation_ids(pretrained_settings(folder), generation, lambda: _sp_piece(sp_file))
            settings["prepend_scheme"] = hf_prepend_scheme(folder)
            return VishwamAITokenizer(sp_file, **{**settings, **kwargs})
        except ValueError as error:
            refusal = f"the tokenizer.model in {folder} is not usable by VishwamAITokenizer: {error}"
            if not json_file.is_file():
                raise ValueError(f"load_hf_tokenizer: {refusal}") from None
    try:
        settings = _with_generation_ids(pretrained_settings(folder), generation, lambda: _json_token(json_file))
        return JsonTokenizer(json_file, **{**settings, **kwargs})
    except ValueError as error:
        also = f" ({refusal})" if refusal else ""
        raise ValueError(f"load_hf_tokenizer: the tokenizer.json in {folder} is not usable: {error}{also}") from None


GENERATION_CONFIG_FILE = "generation_config.json"


def _generation_config(folder: Path) -> dict[str, Any]:
    path = folder / GENERATION_CONFIG_FILE
    return read_json_object(path) if path.is_file() else {}


def _stop_ids(value: Any) -> list[int]:
    """`eos_token_id` of an HF config: an int, a list of ints, or absent."""
    ids = [value] if isinstance(value, int) else value if isinstance(value, list) else []
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def _with_generation_ids(settings: dict[str, Any], generation: Mapping[str, Any], lookup) -> dict[str, Any]:
    """`settings` plus the tokens of generation_config.json's pad/bos/eos ids the tokenizer
    files do not name; `lookup()` gives the id -> token function (built only when needed)."""
    wanted = {}
    for name in ("pad", "bos", "eos"):
        ids = _stop_ids(generation.get(f"{name}_token_id"))
        if ids and f"{name}_token" not in settings:
            wanted[name] = ids[0]
    if not wanted:
        return settings
    token_of = lookup()
    return {**settings, **{f"{name}_token": token_of(i) for name, i in wanted.items()}}


def _sp_piece(path: Path):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(path.read_bytes())
    return processor.id_to_piece


def _json_token(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).id_to_token


def load_hf_pipeline(directory: str | os.PathLike, *, dtype: Any = None, mesh: Mesh | None = None,
                     partition: PartitionFn | None = None, add_bos: bool | None = None):
    """A `VishwamAIPipeline` from an HF directory: `load_hf_checkpoint` plus `load_hf_tokenizer`.

    Generation stops at the model's own EOS ids: `eos_token_id` (an int or a list) of
    `generation_config.json`, else of `config.json`, else the tokenizer's EOS.
    """
    from .pipeline import VishwamAIPipeline

    folder = Path(directory)
    tokenizer = load_hf_tokenizer(folder)
    model, _ = load_hf_checkpoint(folder, dtype=dtype, mesh=mesh, partition=partition)
    return VishwamAIPipeline(model, tokenizer, add_bos=add_bos, eos_ids=generation_eos_ids(folder) or None)


def generation_eos_ids(directory: str | os.PathLike) -> list[int]:
    """The ids an HF model stops generating at: `eos_token_id` (an int or a list) of its
    `generation_config.json`, else of its `config.json`; `[]` when neither names one."""
    folder = Path(directory)
    stop = _stop_ids(_generation_config(folder).get("eos_token_id"))
    if not stop and (folder / CONFIG_FILE).is_file():
        stop = _stop_ids(_read_hf_config(folder).get("eos_token_id"))
    return stop
