"""transformers' (5.x) `LlamaTokenizer` over a SentencePiece model: the ids and texts of
`VishwamAITokenizer` with a ``prepend_scheme``. The text is split at the added tokens, each
part between them is encoded without the dummy prefix after the space its prepend scheme
puts first; decoding skips or shows the special pieces and drops one leading space."""

import re
from collections.abc import Callable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from ._format import META as _META

# transformers' Metaspace prepend schemes (`VishwamAITokenizer`'s ``prepend_scheme``).
PREPEND_SCHEMES = ("always", "first", "never")


class LlamaRules:
    """What ``prepend_scheme`` needs: a copy of the model without the dummy prefix, the
    pieces transformers matches in raw text (its added tokens: the special tokens and the
    model's control and user-defined pieces, longest first at each position), and the
    ids its decode skips or shows as their piece.

    Arguments:
        proto: the serialized SentencePiece model.
        special_pieces: ``{id: piece}`` of the tokenizer's pad, unk, bos and eos tokens.
        scheme: one of `PREPEND_SCHEMES`.
        num_threads: SentencePiece threads for batch calls (``-1``: every core).
    """

    def __init__(self, proto: bytes, special_pieces: dict[int, str], scheme: str, num_threads: int):
        self._scheme = scheme
        self._num_threads = num_threads
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(proto)
        model.normalizer_spec.add_dummy_prefix = False
        self.plain = spm.SentencePieceProcessor()
        self.plain.LoadFromSerializedProto(model.SerializeToString())
        kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
        control = {i: p.piece for i, p in enumerate(model.pieces) if p.type == kinds.CONTROL}
        user = {i: p.piece for i, p in enumerate(model.pieces) if p.type == kinds.USER_DEFINED}
        self.specials = {**control, **special_pieces}
        self._added = {piece: i for i, piece in {**user, **self.specials}.items()}
        alternatives = sorted(self._added, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """transformers' ids of `texts` (``prepend_scheme``): added-token ids, and the parts
        between them encoded by the no-dummy-prefix model, all parts in one sp call."""
        split = [self._parts(text) for text in texts]
        strings = [part for parts in split for part in parts if type(part) is str]
        if not strings:
            encoded = iter(())
        elif len(strings) == 1:  # sp's single-text call: no thread-pool round trip
            encoded = iter([self.plain.encode(strings[0])])
        else:
            encoded = iter(self.plain.encode(strings, num_threads=self._num_threads))
        out = []
        for parts in split:
            if len(parts) == 1 and type(parts[0]) is str:
                out.append(next(encoded))
                continue
            ids: list[int] = []
            for part in parts:
                if type(part) is str:
                    ids.extend(next(encoded))
                else:
                    ids.append(part)
            out.append(ids)
        return out

    def _parts(self, text: str) -> list[str | int]:
        """`text` as transformers' pre-tokenizer sees it: the id of each added token, and
        each non-empty text between them with the space its prepend scheme puts first."""
        parts: list[str | int] = []
        start = 0
        for match in self._split.finditer(text) if self._split is not None else ():
            self._part(text[start : match.start()], start == 0, parts)
            parts.append(self._added[match.group()])
            start = match.end()
        self._part(text[start:], start == 0, parts)
        return parts

    def _part(self, part: str, begins_text: bool, parts: list[str | int]) -> None:
        if not part:
            return
        scheme = self._scheme
        if (scheme == "always" or (scheme == "first" and begins_text)) and not part.startswith((" ", _META)):
            part = " " + part
        parts.append(part)

    def decode(self, ids: list[int], skip_special_tokens: bool, decode_plain: Callable[[list[int]], str]) -> str:
        """transformers' decode (``prepend_scheme``): the special and control pieces skipped
        or shown as their text, the rest as the no-dummy-prefix model spells it, then one
        leading space dropped (its Strip decoder; none with ``"never"``). `decode_plain(ids)` is the
        text of ids of neither kind."""
        specials = self.specials
        if skip_special_tokens or specials.keys().isdisjoint(ids):
            kept = [i for i in ids if i not in specials] if skip_special_tokens else ids
            text = decode_plain(kept)
        else:
            parts, run = [], []
            for i in [*ids, None]:  # None flushes the last run
                if i is not None and i not in specials:
                    run.append(i)
                    continue
                if run:
                    parts.append(decode_plain(run))
                    run = []
                if i is not None:
                    parts.append(specials[i])
            text = "".join(parts)
        return text[1:] if self._scheme != "never" and text.startswith(" ") else text
