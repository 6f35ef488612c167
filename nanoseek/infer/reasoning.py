"""R1 reasoning split: the text inside <think>...</think> is `reasoning_content`, the rest `content`.

Rules (the same for the whole text and for a stream of deltas):
- If the prompt already opened a think block (`prompt_opens_think`: its last <think> is not closed,
  as with templates that pre-fill "<think>\\n"), the completion starts inside it.
- Otherwise the first <think> of the completion opens the block; text before it is content.
- The first </think> closes it; everything after is content (later tags are plain text).
- An unterminated block is all reasoning. No think block at all: reasoning is None.
The tags themselves are dropped; no whitespace is stripped, so the streamed deltas concatenate to
exactly the non-streaming split.
"""

from __future__ import annotations

from ..data.r1_format import END_THINK, THINK


def prompt_opens_think(prompt: str) -> bool:
    """True when the prompt ends inside an open <think> block (the completion continues it)."""
    return prompt.rfind(THINK) > prompt.rfind(END_THINK)


def split_reasoning(text: str, think_opened: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a completion. `think_opened`: the prompt opened the block."""
    before = ""
    if not think_opened:
        i = text.find(THINK)
        if i < 0:
            return None, text
        before, text = text[:i], text[i + len(THINK):]
    j = text.find(END_THINK)
    if j < 0:
        return text, before
    return text[:j], before + text[j + len(END_THINK):]


class ReasoningStream:
    """Incremental `split_reasoning` for streamed text: feed deltas, get (reasoning_delta, content_delta).

    A delta that ends with the beginning of the awaited tag (e.g. "</th") is held back until the
    next delta decides; call `finish()` at the end to release it.
    """

    def __init__(self, think_opened: bool = False):
        self.state = "think" if think_opened else "before"
        self.buffer = ""
        self.saw_think = think_opened

    def feed(self, delta: str) -> tuple[str, str]:
        self.buffer += delta
        reasoning, content = [], []
        while self.buffer:
            if self.state == "after":
                content.append(self.buffer)
                self.buffer = ""
                break
            tag, out = (THINK, content) if self.state == "before" else (END_THINK, reasoning)
            i = self.buffer.find(tag)
            if i >= 0:
                out.append(self.buffer[:i])
                self.buffer = self.buffer[i + len(tag):]
                self.state = "think" if self.state == "before" else "after"
                self.saw_think = True
                continue
            keep = _partial_tag_suffix(self.buffer, tag)
            out.append(self.buffer[:len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Release held-back text: a partial tag that never completed is plain text."""
        rest, self.buffer = self.buffer, ""
        return (rest, "") if self.state == "think" else ("", rest)


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
