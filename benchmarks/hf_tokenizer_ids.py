"""vishwam's HF tokenizers against transformers.AutoTokenizer: the same ids from the same files?

    pip install transformers                        # in a separate venv (not a vishwam dependency)
    python benchmarks/hf_tokenizer_ids.py                            # two tokenizers built here
    python benchmarks/hf_tokenizer_ids.py ~/models/TinyLlama-1.1B ~/models/Qwen2-0.5B   # real checkpoints

For each HF directory (by default: a Llama-style SentencePiece `tokenizer.model` with
unk 0, bos 1, eos 2, no pad and byte fallback, under four tokenizer_config.json variants:
`legacy` true, false or absent, and `add_prefix_space` false; the same kind of model
trained as `VishwamAITokenizer.train` does, with whitespace-only pieces and a user-defined
symbol; and a byte-level BPE `tokenizer.json` whose post-processor prepends BOS; all built
here), `vishwam.hf.load_hf_tokenizer` and `transformers.AutoTokenizer.from_pretrained`
encode the same texts (among them texts that begin with spaces, hold special-token text
such as `<s>` or a literal U+2581), and the script counts the texts whose ids differ:

- `encode`: ids of the text alone (`add_special_tokens=False` in transformers);
- `call`: `tokenizer(text)["input_ids"]`, where transformers adds its special tokens
  (Llama's `add_bos_token`, a tokenizer.json's post-processor) and vishwam its BOS/EOS;
- `decode`: `decode(ids, skip_special_tokens=True)` of those ids (transformers may
  clean up spaces before punctuation where `clean_up_tokenization_spaces` is set;
  vishwam never does, so a difference here is reported, not counted as a failure), and
  with `skip_special_tokens=False` ("shown");
- the special ids (`bos`, `eos`, `pad`; transformers' pad is `None` where the files name
  none, vishwam's is then documented in `VishwamAITokenizer` / `JsonTokenizer`).

Exits 1 if any `encode` or `call` ids differ.
"""

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

try:
    import transformers
except ImportError as error:
    raise SystemExit(f"benchmarks/hf_tokenizer_ids.py needs transformers ({error}); install it into a separate "
                     "venv: pip install transformers") from None

from vishwam.hf import load_hf_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnew lines\n\n",
    "héllo wörld ✓ ünïcode, नमस्ते दुनिया, 你好，世界",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # code",
    "Numbers 1234567890 and 3.14159, don't stop: it's fine.",
    "",
    "<s>a dialogue</s><s> next turn</s>",
    "a\u2581literal marker, \u2581 and <unk> and <tool> text",
]


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)[:80]] + TEXTS * 10


# tokenizer_config.json variants of the SentencePiece directory; None drops the key.
SENTENCEPIECE_VARIANTS = {
    "legacy_true": {},
    "legacy_false": {"legacy": False},
    "legacy_absent": {"legacy": None},
    "no_prefix_space": {"add_prefix_space": False},
}


def build_sentencepiece(folder: Path, config: dict | None = None, **trainer_options) -> Path:
    """A Llama-style tokenizer.model with Llama's tokenizer_config.json, changed by `config`."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for doc in _corpus() for line in doc.split("\n") if line.strip()]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=2000,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False,
                                   minloglevel=2, **trainer_options)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    settings = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}, **(config or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    return folder


def build_byte_level_bpe(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json (Llama 3 / GPT-2 style) with a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False}))
    return folder


def compare(folder: Path, texts: list[str]) -> bool:
    ours = load_hf_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    encode = sum(ours.encode(t) != theirs.encode(t, add_special_tokens=False) for t in texts)
    ours_call = [ours(t, padding=False, truncation=False)["input_ids"] for t in texts]
    theirs_call = [theirs(t)["input_ids"] for t in texts]
    call = sum(a != b for a, b in zip(ours_call, theirs_call))
    decode = sum(ours.decode(ids) != theirs.decode(ids, skip_special_tokens=True) for ids in theirs_call)
    shown = sum(ours.decode(ids, skip_special_tokens=False) != theirs.decode(ids) for ids in theirs_call)
    scheme = f", prepend_scheme {ours.prepend_scheme!r}" if hasattr(ours, "prepend_scheme") else ""
    print(f"{folder.name}: {type(ours).__name__} vs {type(theirs).__name__}, {len(texts)} texts{scheme}")
    print(f"  ids differ: encode {encode}, call {call}; decoded text differs: {decode}, shown {shown}")
    print(f"  special ids (vishwam / transformers): bos {ours.bos_id} / {theirs.bos_token_id}, "
          f"eos {ours.eos_id} / {theirs.eos_token_id}, pad {ours.pad_id} / {theirs.pad_token_id}")
    if encode or call:
        bad = next(i for i, t in enumerate(texts) if ours.encode(t) != theirs.encode(t, add_special_tokens=False)
                   or ours_call[i] != theirs_call[i])
        print(f"  first difference, text {bad}: {texts[bad]!r:.80}\n    vishwam      {ours_call[bad][:24]}\n"
              f"    transformers {theirs_call[bad][:24]}")
    return not (encode or call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="*", type=Path, help="HF directories (default: two built here)")
    args = parser.parse_args(argv)
    print(f"transformers {transformers.__version__}")
    texts = TEXTS + [line for doc in _corpus()[:40] for line in doc.split("\n")[:20]]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folders = args.directories or [
            *(build_sentencepiece(root / f"sentencepiece_{name}", config)
              for name, config in SENTENCEPIECE_VARIANTS.items()),
            build_sentencepiece(root / "sentencepiece_vishwam_trainer", allow_whitespace_only_pieces=True,
                                user_defined_symbols=["<tool>"]),
            build_byte_level_bpe(root / "byte_level_bpe")]
        results = [compare(folder, texts) for folder in folders]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
