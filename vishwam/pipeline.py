"""`VishwamAIPipeline`: a model and its tokenizer, text in, text out; save and load.

A saved pipeline is a directory:

    config.json          the `ModelConfig` (JSON)
    model.safetensors    every array leaf of the model, named by its pytree path
                         (`jax.tree_util.keystr`, e.g. `.stages[0].blocks[0].attn.q_proj.weight`)
    tokenizer/           `tokenizer.save_pretrained` output (SentencePiece or tokenizer.json)
    pipeline.json        format version and the pipeline's own settings (`add_bos`, `eos_ids`)

No pickle: the model is rebuilt from `config.json` and filled from the safetensors
file, which must hold exactly the leaves that config implies.
"""

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .config import ModelConfig
from .errors import InvalidTypeError, InvalidValueError
from .files import atomic_directory
from .generation import generate, generate_stream
from .model import VishwamAI, abstract_model
from .tokenizer import PipelineTokenizer as PipelineTokenizer
from .tokenizer import load_hf_tokenizer

_FORMAT = 1
_CONFIG, _WEIGHTS, _TOKENIZER, _PIPELINE = "config.json", "model.safetensors", "tokenizer", "pipeline.json"
# Prompt widths are rounded up to this multiple so that prompts of similar length share one compiled loop.
_WIDTH_BUCKET = 16

TokenCallback = Callable[[int, int, str], None]


class VishwamAIPipeline:
    """Text completion with a `VishwamAI` model and its tokenizer.

    Arguments:
        model: the language model.
        tokenizer: a `VishwamAITokenizer` or `JsonTokenizer` (or anything with `encode`,
            `decode`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `save_pretrained`); the
            model's `vocab_size` must be at least its `vocab_size`.
        config: the model's config, if you want it checked; must equal `model.config`.
        add_bos: start every prompt with BOS. `None` follows the tokenizer's
            `add_bos_token` (False if it has none). With `add_bos=False` an empty
            prompt is an error; with BOS, an empty prompt means "start a document".
        eos_ids: the ids generation stops at (the model's, e.g. the `eos_token_id` list
            of an HF `generation_config.json`); `None` means the tokenizer's EOS.
    """

    def __init__(self, model: VishwamAI, tokenizer: PipelineTokenizer, config: ModelConfig | None = None, *,
                 add_bos: bool | None = None, eos_ids: Sequence[int] | None = None):
        if config is not None and config != model.config:
            raise InvalidValueError(f"VishwamAIPipeline: `config` differs from model.config in "
                                    f"{config.diff(model.config)} (given, model); pass config=None to use the model's.")
        missing = [name for name in ("encode", "decode", "vocab_size", "pad_id", "bos_id", "eos_id",
                                     "save_pretrained") if not hasattr(tokenizer, name)]
        if missing:
            raise InvalidTypeError(f"VishwamAIPipeline: the tokenizer ({type(tokenizer).__name__}) lacks {missing}.")
        # HF checkpoints may pad their embedding past the tokenizer (Qwen2: 151936 rows, 151665 ids).
        if int(tokenizer.vocab_size) > model.config.vocab_size:
            raise InvalidValueError(
                f"VishwamAIPipeline: the tokenizer has vocab_size={tokenizer.vocab_size} but the model has "
                f"vocab_size={model.config.vocab_size}; the model needs a row for every token id. Build the model "
                f"with ModelConfig(vocab_size={tokenizer.vocab_size}, ...) or load the tokenizer it was trained with.")
        stop = (int(tokenizer.eos_id),) if eos_ids is None else tuple(eos_ids)
        if not stop or not all(isinstance(i, int) and 0 <= i < model.config.vocab_size for i in stop):
            raise InvalidValueError(f"VishwamAIPipeline: eos_ids must be a non-empty list of ids in [0, "
                                    f"{model.config.vocab_size}), got {eos_ids!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.add_bos = bool(getattr(tokenizer, "add_bos_token", False)) if add_bos is None else bool(add_bos)
        self.eos_ids = stop

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    # ------------------------------------------------------------------ completion
    def __call__(
        self,
        prompts: str | list[str],
        max_new_tokens: int = 64,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        key: PRNGKeyArray | None = None,
        callback: TokenCallback | None = None,
    ) -> list[str]:
        """Complete each prompt; returns the completions only (without the prompt or EOS).

        Arguments:
            prompts: one text or a list of texts (completed as one batch).
            max_new_tokens: at most this many tokens per prompt; a row stops at any of `eos_ids`.
            temperature, top_k, top_p: sampling, as in `vishwam.generate`
                (`temperature=0` is greedy).
            seed / key: randomness for sampling (give at most one); default seed 0,
                so repeated calls return the same texts.
            callback: `callback(row, token_id, text)` once per generated token, in
                order, as soon as it is produced; `text` is the new text it completes
                (may be empty: EOS, or a multi-byte character still incomplete; a row's
                last token flushes what was held back), so a row's texts join to its
                completion. With a callback, decoding runs one jitted step per token
                from Python (`generate_stream`); the tokens are the same as without.

        Returns:
            One completion per prompt (a list even for a single string).
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidTypeError("VishwamAIPipeline: prompts must be a str or a non-empty list of str, "
                                   f"got {prompts!r:.80}.")
        if seed is not None and key is not None:
            raise InvalidValueError("VishwamAIPipeline: give `seed` or `key`, not both.")
        key = jax.random.key(0 if seed is None else seed) if key is None else key
        ids = [self.tokenizer.encode(t, add_bos=self.add_bos) for t in texts]
        prompt, lengths = self._batch(ids, max_new_tokens)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, key=key, eos_id=list(self.eos_ids),
                        prompt_lengths=lengths, pad_id=int(self.tokenizer.pad_id))
        if callback is None:
            tokens, ends = generate(self.model, prompt, max_new_tokens, **sampling)
            tokens, ends = np.asarray(tokens), np.asarray(ends)
            completions = [tokens[i, lengths[i]:ends[i]].tolist() for i in range(len(texts))]
        else:
            completions = self._stream(ids, prompt, max_new_tokens, sampling, callback)
        return [self._completion_text(p, c) for p, c in zip(ids, completions, strict=True)]

    def _completion_text(self, prompt_ids: list[int], completion_ids: list[int]) -> str:
        """The completion's text as it continues the prompt (EOS dropped). Decoding the
        completion alone would lose the space SentencePiece folds into a first piece
        like "▁word"; so decode prompt + completion and cut the prompt's text off."""
        completion = [t for t in completion_ids if t not in self.eos_ids]
        head = self.tokenizer.decode(prompt_ids)
        text = self.tokenizer.decode(prompt_ids + completion)
        return text[len(head):] if text.startswith(head) else self.tokenizer.decode(completion)

    def _batch(self, ids: list[list[int]], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded `[batch, width]` prompts and their lengths; the width is bucketed."""
        limit = self.config.max_seq_len
        for i, row in enumerate(ids):
            if not row:
                raise InvalidValueError(f"VishwamAIPipeline: prompt {i} is empty; give some text, or build the "
                                        "pipeline with add_bos=True to start from BOS alone.")
            if len(row) + max_new_tokens > limit:
                raise InvalidValueError(
                    f"VishwamAIPipeline: prompt {i} has {len(row)} tokens; + max_new_tokens {max_new_tokens} = "
                    f"{len(row) + max_new_tokens} exceeds the model's max_seq_len={limit}. Shorten the prompt "
                    f"or ask for at most {limit - len(row)} new tokens.")
        longest = max(map(len, ids))
        width = min(-(-longest // _WIDTH_BUCKET) * _WIDTH_BUCKET, limit - max_new_tokens)
        prompt = np.full((len(ids), width), int(self.tokenizer.pad_id), np.int32)
        for i, row in enumerate(ids):
            prompt[i, :len(row)] = row
        return prompt, np.array([len(row) for row in ids], np.int32)

    def _stream(self, ids: list[list[int]], prompt, max_new_tokens, sampling,
                callback: TokenCallback) -> list[list[int]]:
        rows = range(prompt.shape[0])
        completions: list[list[int]] = [[] for _ in rows]
        emitted = ["" for _ in rows]
        for step, (tokens, active) in enumerate(generate_stream(self.model, prompt, max_new_tokens, **sampling)):
            for i in rows:
                if not active[i]:
                    continue
                token = int(tokens[i])
                completions[i].append(token)
                text = self._completion_text(ids[i], completions[i])
                last = token in self.eos_ids or step == max_new_tokens - 1
                # Shown text must stay a prefix of the final text: hold back a trailing
                # replacement character (a multi-byte character may still be incomplete)
                # until the row's last token.
                delta = ""
                if text.startswith(emitted[i]) and (last or not text.endswith("\ufffd")):
                    delta, emitted[i] = text[len(emitted[i]):], text
                callback(i, token, delta)
        return completions

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the pipeline directory (see the module docstring) atomically: it is
        assembled next to its destination and swapped into place (`vishwam.files.atomic_directory`),
        so an interrupted save never leaves a half-written pipeline, and `overwrite=True`
        replaces an existing one only once the new one is complete. Returns the directory."""
        from safetensors.numpy import save_file

        target = Path(directory).absolute()
        if target.exists() and not overwrite:
            raise FileExistsError(f"VishwamAIPipeline.save: {target} already exists; pass overwrite=True "
                                  "or choose another directory.")
        with atomic_directory(target, overwrite=overwrite) as staging:
            (staging / _CONFIG).write_text(self.config.to_json())
            (staging / _PIPELINE).write_text(json.dumps({"format": _FORMAT, "add_bos": self.add_bos,
                                                         "eos_ids": list(self.eos_ids)}, indent=2))
            save_file(_named_arrays(self.model), str(staging / _WEIGHTS),
                      metadata={"format": "vishwam", "vishwam_format": str(_FORMAT)})
            self.tokenizer.save_pretrained(staging / _TOKENIZER)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike, *, tokenizer: PipelineTokenizer | None = None) -> "VishwamAIPipeline":
        """Load a directory written by `save`, or a training run's exported `pipeline/`.

        Arguments:
            directory: the pipeline directory, or a run directory holding `pipeline/`
                (the trainer writes it when a run finishes; for a checkpoint of an
                unfinished run use `vishwam.model_dirs.load_model_dir`).
            tokenizer: use this tokenizer instead of `directory/tokenizer`.
        """
        folder = Path(directory)
        if not (folder / _PIPELINE).exists() and (folder / "pipeline" / _PIPELINE).exists():
            folder = folder / "pipeline"
        needed = [_CONFIG, _WEIGHTS, _PIPELINE] + ([] if tokenizer is not None else [_TOKENIZER])
        missing = [name for name in needed if not (folder / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"VishwamAIPipeline.load: {folder} lacks {missing}; expected a directory written by "
                f"VishwamAIPipeline.save ({_CONFIG}, {_WEIGHTS}, {_TOKENIZER}/, {_PIPELINE}).")
        settings = json.loads((folder / _PIPELINE).read_text())
        if settings.get("format") != _FORMAT:
            raise InvalidValueError(f"VishwamAIPipeline.load: {folder / _PIPELINE} has format {settings.get('format')!r}; "
                                    f"this version reads format {_FORMAT}.")
        config = ModelConfig.from_json(folder / _CONFIG)
        model = load_model_weights(folder / _WEIGHTS, config)
        if tokenizer is None:
            tokenizer = load_hf_tokenizer(folder / _TOKENIZER)
        return cls(model, tokenizer, add_bos=settings["add_bos"], eos_ids=settings.get("eos_ids"))


# ------------------------------------------------------------------------- weights
def _named_arrays(model: VishwamAI) -> dict[str, np.ndarray]:
    """Every array leaf of the model under its pytree path."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def load_model_weights(path: str | os.PathLike, config: ModelConfig) -> VishwamAI:
    """Build a `VishwamAI(config)` from a safetensors file written by `VishwamAIPipeline.save`.

    Raises `ValueError` naming every missing, unexpected or mis-shaped tensor: the
    file must hold exactly the leaves `config` implies.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    abstract = abstract_model(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    try:
        stored = load_file(str(path))
    except SafetensorError as error:
        raise InvalidValueError(f"load_model_weights: {path} is not a readable safetensors file ({error}); it is "
                                "truncated or of another format: save it again.") from None
    wanted = {jax.tree_util.keystr(p): leaf for p, leaf in leaves}
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    differ = [f"{name}: file {stored[name].dtype}{list(stored[name].shape)}, config {leaf.dtype}{list(leaf.shape)}"
              for name, leaf in wanted.items()
              if name in stored and (stored[name].shape != leaf.shape or stored[name].dtype != leaf.dtype)]
    if missing or unexpected or differ:
        raise InvalidValueError(
            f"load_model_weights: {path} does not fit the config: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, different shape/dtype {differ[:8]}. The weights were saved from another "
            "config; load them with the config.json they were saved with.")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(stored[jax.tree_util.keystr(p)]) for p, _ in leaves])
