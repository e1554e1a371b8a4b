"""Fixed facts of the tokenizer formats, shared by the modules of this package."""

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_NAMES = ("pad", "unk", "bos", "eos")  # index == fixed id
DEFAULT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

# SentencePiece's whitespace marker. Text spaces become it, and sp renders it back as a
# space, so a literal U+2581 in the input needs the byte-level escape of
# `VishwamAITokenizer._encode_meta`.
META = "\u2581"
