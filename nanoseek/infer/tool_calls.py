"""DeepSeek tool calls in model output -> OpenAI `tool_calls`, for whole outputs and streamed deltas.

The released models write calls with their tool-call tokens after the answer text (docs/design/tokenizers.md,
"Tool calls"):

    V3 / R1:  <｜tool▁calls▁begin｜>
                  <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜> ...
              <｜tool▁calls▁end｜>
    V3.1:     <｜tool▁calls▁begin｜>
                  <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜> ...
              <｜tool▁calls▁end｜>
    (one line each in the output; broken here for width)

Rules (vLLM's deepseek_v3 / deepseek_v31 tool parsers, made one streamable rule):
- Text before `<｜tool▁calls▁begin｜>` is content; from there on only calls count (text between or after them,
  e.g. R1's "\\n" between calls, is dropped).
- A call's text up to `<｜tool▁sep｜>` is its head. The V3 layout is recognised when the head is "function" and
  the text after the separator starts with a name line and "```json\\n": the name is that line, the arguments
  what follows, less a closing "\\n```". Otherwise (V3.1) the head is the name and the text after the separator
  the arguments. Arguments are passed on verbatim (a JSON string, as OpenAI's API sends them).
- A call without a separator is dropped; a call cut short (max_tokens) keeps the name and arguments it got.
- `ToolCallStream` emits a call's name as soon as its layout is known and its arguments as they arrive,
  holding back only text that may be the start of a closing tag, so the streamed deltas add up to exactly
  the whole-output parse (which is the stream fed all at once).
"""

from __future__ import annotations

import uuid

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_V3_TYPE, _FENCE_OPEN, _FENCE_CLOSE = "function", "\n```json\n", "\n```"


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content before the calls, OpenAI tool calls [{"id", "type", "function": {"name", "arguments"}}])."""
    stream = ToolCallStream()
    content, deltas = stream.feed(text)
    more, tail = stream.finish()
    return content + more, merge_deltas(deltas + tail)


def merge_deltas(deltas: list[dict]) -> list[dict]:
    """The tool calls that streamed `deltas` add up to (an OpenAI client's accumulation)."""
    calls: list[dict] = []
    for d in deltas:
        if d["index"] == len(calls):
            calls.append({"id": d["id"], "type": d["type"], "function": {"name": d["function"]["name"],
                                                                         "arguments": ""}})
        calls[d["index"]]["function"]["arguments"] += d["function"].get("arguments", "")
    return calls


class ToolCallStream:
    """Incremental tool-call parsing: `feed(delta)` -> (content_delta, tool-call deltas in OpenAI's stream shape:
    the first of a call {"index", "id", "type", "function": {"name", "arguments": ""}}, then {"index", "function":
    {"arguments": piece}}); `finish()` at the end releases what was held back."""

    def __init__(self):
        self.state = "content"   # content -> between <-> head -> (v3_name ->) args; -> done after CALLS_END
        self.buf = ""
        self.count = 0           # calls named so far
        self.v3 = False          # the current call uses the V3 layout (closing fence to strip)
        self.called = False      # CALLS_BEGIN was seen

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.buf += delta
        content, calls = [], []
        while self._step(content, calls):
            pass
        return "".join(content), calls

    def finish(self) -> tuple[str, list[dict]]:
        rest, self.buf = self.buf, ""
        if self.state == "content":
            return rest, []
        if self.state == "args" and rest:
            return "", [self._args(rest)]
        return "", []

    # ---- the state machine -------------------------------------------------------------------------------
    def _step(self, content: list, calls: list) -> bool:
        """Advance over self.buf; True while progress can still be made."""
        buf = self.buf
        if self.state == "content":
            i = buf.find(CALLS_BEGIN)
            if i < 0:
                keep = _partial_suffix(buf, CALLS_BEGIN)
                content.append(buf[:len(buf) - keep])
                self.buf = buf[len(buf) - keep:]
                return False
            content.append(buf[:i])
            self.buf, self.state, self.called = buf[i + len(CALLS_BEGIN):], "between", True
            return True
        if self.state == "between":
            i, j = buf.find(CALL_BEGIN), buf.find(CALLS_END)
            if j >= 0 and (i < 0 or j < i):
                self.buf, self.state = "", "done"
                return False
            if i < 0:
                self.buf = buf[len(buf) - max(_partial_suffix(buf, CALL_BEGIN), _partial_suffix(buf, CALLS_END)):]
                return False
            self.buf, self.state = buf[i + len(CALL_BEGIN):], "head"
            return True
        if self.state == "head":
            i, j = buf.find(SEP), buf.find(CALL_END)
            if j >= 0 and (i < 0 or j < i):  # a call without a separator: dropped
                self.buf, self.state = buf[j + len(CALL_END):], "between"
                return True
            if i < 0:
                return False
            head, self.buf = buf[:i], buf[i + len(SEP):]
            if head == _V3_TYPE:
                self.state = "v3_name"
            else:
                calls.append(self._open(head, v3=False))
            return True
        if self.state == "v3_name":
            i = buf.find("\n")
            fence = buf[i:i + len(_FENCE_OPEN)] if i >= 0 else ""
            if i >= 0 and SEP not in buf[:i] and CALL_END not in buf[:i] and fence == _FENCE_OPEN:
                calls.append(self._open(buf[:i], v3=True))
                self.buf = buf[i + len(_FENCE_OPEN):]
                return True
            undecided = (i < 0 or _FENCE_OPEN.startswith(fence)) and CALL_END not in buf and SEP not in buf
            if undecided:
                return False
            calls.append(self._open(_V3_TYPE, v3=False))  # not the V3 layout: "function" is the name
            return True
        if self.state == "args":
            i = buf.find(CALL_END)
            if i < 0:
                keep = _partial_suffix(buf, CALL_END)
                if self.v3:
                    keep = max(keep, _partial_suffix(buf, _FENCE_CLOSE + CALL_END))
                if len(buf) > keep:
                    calls.append(self._args(buf[:len(buf) - keep]))
                self.buf = buf[len(buf) - keep:]
                return False
            piece = buf[:i]
            if self.v3 and piece.endswith(_FENCE_CLOSE):
                piece = piece[:-len(_FENCE_CLOSE)]
            if piece:
                calls.append(self._args(piece))
            self.buf, self.state = buf[i + len(CALL_END):], "between"
            return True
        self.buf = ""  # done: text after the calls is dropped
        return False

    def _open(self, name: str, v3: bool) -> dict:
        self.state, self.v3 = "args", v3
        self.count += 1
        return {"index": self.count - 1, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": ""}}

    def _args(self, piece: str) -> dict:
        return {"index": self.count - 1, "function": {"arguments": piece}}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
