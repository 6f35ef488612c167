"""Incremental detokenization: text grows token by token without emitting half a UTF-8 character.

The window trick of TGI/vLLM: decode ids[prefix:] and ids[prefix:read]; the difference is the new
text, emitted only when it does not end in U+FFFD (an incomplete byte sequence, e.g. the first
token of a multi-byte character). The window restarts at the last emitted boundary, so each call
decodes a handful of tokens, not the whole output. At the end, `flush` emits whatever is left
(a truly invalid tail stays as U+FFFD, exactly what a full decode gives).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0   # start of the decode window: a character boundary
        self.read = 0     # tokens up to here are already in the text

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def extend(self, token_ids: list[int], flush: bool = False) -> str:
        """Append several tokens; return the newly complete text (with flush, all of it). The first call with
        flush is one decode of the whole list (what token-by-token adds followed by flush give)."""
        if flush and not self.ids:
            self.ids = list(token_ids)
            self.prefix = self.read = len(self.ids)
            return self._decode(self.ids)
        text = "".join(self.add(t) for t in token_ids)
        return text + self.flush() if flush else text

    def flush(self) -> str:
        """Text of the tokens held back so far (an unfinished character decodes to U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
