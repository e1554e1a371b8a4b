"""`load_hf_pipeline`: a `VishwamAIPipeline` from an HF checkpoint directory."""

import os
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from ..pipeline import VishwamAIPipeline
from ..tokenizer import generation_eos_ids, load_hf_tokenizer
from .weights import PartitionFn, load_hf_checkpoint


def load_hf_pipeline(directory: str | os.PathLike, *, dtype: Any = None, mesh: Mesh | None = None,
                     partition: PartitionFn | None = None, add_bos: bool | None = None) -> VishwamAIPipeline:
    """A `VishwamAIPipeline` from an HF directory: `load_hf_checkpoint` plus `load_hf_tokenizer`.

    Generation stops at the model's own EOS ids: `eos_token_id` (an int or a list) of
    `generation_config.json`, else of `config.json`, else the tokenizer's EOS.
    """
    folder = Path(directory)
    tokenizer = load_hf_tokenizer(folder)
    model, _ = load_hf_checkpoint(folder, dtype=dtype, mesh=mesh, partition=partition)
    return VishwamAIPipeline(model, tokenizer, add_bos=add_bos, eos_ids=generation_eos_ids(folder) or None)
