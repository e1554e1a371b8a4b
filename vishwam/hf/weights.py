"""Safetensors checkpoints in transformers' layout: `load_hf_checkpoint` and `save_hf_checkpoint`.

Tensors are read one at a time through `safe_open` into preallocated stacked arrays, so
the file is never held in memory twice, and go straight onto a mesh when one is given.
Checkpoints are one `model.safetensors` or the shards listed in `model.safetensors.index.json`.
No pickle: `.bin` checkpoints are refused.
"""

import json
import os
import re
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..arrays import combine_arrays, partition_arrays
from ..config import ModelConfig
from ..errors import InvalidValueError
from ..files import atomic_write_bytes
from ..model import VishwamAI, abstract_model
from ..parallel.sharding import partition_spec
from ..tokenizer.loading import CONFIG_FILE
from .config import _read_hf_config, config_from_hf, config_to_hf
from .families import family_for, family_of
from .tensor_map import _leaf_paths, _Piece, _tensor_map

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_TENSOR_DTYPES = ("F16", "BF16", "F32", "F64")
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# Buffers that old transformers versions saved (recomputed, never needed), and the copies of the shared
# embedding and head that DeepSeek-V3 stores in each multi-token prediction layer (the model's own are read).
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$|^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What earlier saves may have left (replaced by a new save): `model.safetensors`, shards, index.
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")
# The safetensors header metadata transformers requires of a PyTorch checkpoint.
_METADATA = {"format": "pt"}

PartitionFn = Callable[[str, tuple[int, ...]], PartitionSpec]


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
            raise InvalidValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {error!r}.") from None
        files = {name: self.folder / file for name, file in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) {absent} that are not in {self.folder}; copy them too.")
        for shard in sorted(set(files.values())):
            stored = set(self._open(shard).keys())
            listed = sorted(name for name, p in files.items() if p == shard and name not in stored)
            if listed:
                raise InvalidValueError(f"{index} maps {listed[:8]} to {shard.name}, which does not hold them; "
                                        "the index and the shards are from different saves.")
        return files

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import SafetensorError, safe_open

            try:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            except SafetensorError as error:
                raise InvalidValueError(f"{path} is not a readable safetensors file ({error}); it is truncated or of "
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
        raise InvalidValueError(
            f"{folder} holds only pickled PyTorch weights {pickled[:4]}; vishwam never unpickles (a pickle can "
            "run arbitrary code). Convert them to safetensors first, e.g. in transformers: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)`."
        )
    loose = sorted(p.name for p in folder.glob("*.safetensors"))
    if loose:
        raise FileNotFoundError(f"{folder} has safetensors shards {loose[:4]} but no {INDEX_FILE} mapping tensors "
                                "to them; copy the index file too.")
    raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE} or {INDEX_FILE}: not a safetensors HF checkpoint.")


def load_hf_checkpoint(
    directory: str | os.PathLike,
    *,
    dtype: Any = None,
    mesh: Mesh | None = None,
    partition: PartitionFn | None = None,
    progress: bool = False,
) -> tuple[VishwamAI, ModelConfig]:
    """Load a transformers safetensors checkpoint of a supported family (`SUPPORTED_ARCHITECTURES`).

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
    hf = _read_hf_config(folder)
    config = config_from_hf(hf, dtype=dtype)
    family = family_of(hf)
    if mesh is not None and partition is None:
        def partition(path, shape):
            return partition_spec(path, shape, mesh)

    with ExitStack() as stack:
        checkpoint = _Checkpoint(folder, stack)
        if family.mtp:
            config = config.replace(mtp_depth=_stored_mtp_depth(checkpoint, config.num_layers))
        abstract = abstract_model(config)
        pieces = _tensor_map(abstract, family)
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
    params, static = partition_arrays(abstract)
    treedef = jax.tree_util.tree_structure(params)
    return combine_arrays(jax.tree_util.tree_unflatten(treedef, arrays), static), config


def _stored_mtp_depth(checkpoint: _Checkpoint, num_layers: int) -> int:
    """How many multi-token prediction modules the checkpoint stores: the layers from
    `num_layers` on that have an `eh_proj` (config.json's `num_nextn_predict_layers` is not
    trusted: transformers writes 1 without saving any)."""
    depth = 0
    while f"model.layers.{num_layers + depth}.eh_proj.weight" in checkpoint.files:
        depth += 1
    return depth


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
    past = f"model.layers.{config.num_layers + config.mtp_depth}."
    if any(name.startswith(past) for name in extra):
        problems.insert(0, f"{past}* is a layer past num_hidden_layers={config.num_layers}"
                           f"{f' and {config.mtp_depth} multi-token prediction layers' if config.mtp_depth else ''}: "
                           "vishwam reads such layers only as DeepSeek-V3's multi-token prediction modules, each with "
                           "its eh_proj; drop the tensors (transformers' save_pretrained does)")
    for name in sorted(set(expected) & present, key=_natural):
        shape, dtype = checkpoint.describe(name)
        if shape != expected[name]:
            problems.append(f"{name} has shape {list(shape)}, expected {list(expected[name])}")
        elif dtype not in _FLOAT_TENSOR_DTYPES:
            problems.append(f"{name} has dtype {dtype}, expected a float ({', '.join(_FLOAT_TENSOR_DTYPES)})")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise InvalidValueError(
            f"load_hf_checkpoint: the tensors in {checkpoint.folder} do not fit its config.json "
            f"({config.num_layers} layers, hidden {config.hidden_size}, experts {config.num_experts}):\n  {shown}"
        )


def _check_tied_head(checkpoint: _Checkpoint) -> None:
    if not np.array_equal(checkpoint.read("lm_head.weight"), checkpoint.read("model.embed_tokens.weight")):
        raise InvalidValueError(
            f"load_hf_checkpoint: {checkpoint.folder} says tie_word_embeddings=true, but its lm_head.weight differs "
            "from model.embed_tokens.weight; set tie_word_embeddings to false in config.json."
        )


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

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
        raise InvalidValueError(f"save_hf_checkpoint: `config` differs from model.config in {config.diff(model.config)} "
                                "(given, model); pass model.config.")
    hf = config_to_hf(config, token_ids=token_ids)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = _tensor_map(model, family_for(config), mtp_copies=True)
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
    raise InvalidValueError(f"max_shard_size must be a positive number of bytes or a string like '500MB' or '2GiB', "
                            f"got {size!r}.")


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
