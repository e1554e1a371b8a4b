"""Token ids to streamed text: incremental detokenisation and stop strings."""

from collections.abc import Sequence

# Prompt tokens decoded in front of the completion: enough for a tokenizer to place the
# space SentencePiece folds into a first piece ("▁word"), without decoding a long prompt per token.
_CONTEXT = 8


class IncrementalText:
    """A completion's text as its tokens arrive, shown so that what was shown always stays
    a prefix of the final text: a trailing replacement character (a multi-byte character
    still incomplete) and a tail that may be the start of a stop string are held back.

    Arguments:
        tokenizer: anything with `decode(ids) -> str`.
        prompt_ids: the prompt (its last tokens give the completion's first piece its context).
        stop: strings that end the completion; the text ends before the first one.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.context = list(prompt_ids[-_CONTEXT:])
        self.head = tokenizer.decode(self.context)
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the completion so far (cut at a stop string once one appears)
        self.shown = ""
        self.stopped = False

    def add(self, token: int) -> None:
        """Append a token (not EOS); sets `stopped` when the text now holds a stop string."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.context + self.ids)
        text = full[len(self.head):] if full.startswith(self.head) else self.tokenizer.decode(self.ids)
        ends = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if ends:
            text, self.stopped = text[:min(ends)], True
        self.text = text

    def pop(self, *, final: bool) -> str:
        """The text not shown yet that is safe to show (`final`: all of it)."""
        text = self.text
        if not final:
            if text.endswith("\ufffd"):
                return ""
            held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[:len(text) - held]
        if not text.startswith(self.shown):
            return ""  # a later token rewrote shown text (rare); the rest comes out once it settles
        delta, self.shown = text[len(self.shown):], text
        return delta
