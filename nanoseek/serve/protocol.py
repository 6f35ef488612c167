"""The OpenAI wire format: request models, error bodies, SSE framing.

Key choices:
- Requests are pydantic models that ignore unknown fields (OpenAI clients send many: `user`,
  `logit_bias`, `tools`, ...); ranges are declared on the fields so a 400 names the bad parameter.
- Besides OpenAI's fields, the vLLM sampling extras that RL and eval clients send through
  `extra_body` are accepted: top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos,
  include_stop_str_in_output, skip_special_tokens.
- Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad input.
- Logprobs come from the engine in vLLM's shape (per position a dict token id -> Logprob) and leave as
  OpenAI's legacy completions block (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) or the
  chat `logprobs.content` list.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as an OpenAI error body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(obj: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` for the string)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams fields this request sets (None means: the engine's default)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        kw = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                  repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                  frequency_penalty=self.frequency_penalty, seed=self.seed, stop=stop,
                  stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                  include_stop_str_in_output=self.include_stop_str_in_output,
                  skip_special_tokens=self.skip_special_tokens)
        return {k: v for k, v in kw.items() if v is not None}


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt`: a string, a list of strings, token ids, or a list of token-id lists."""

    prompt: str | list[int] | list[str | list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions; `max_completion_tokens` wins over the deprecated `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages for the chat template (a `developer` message is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ---- response pieces ---------------------------------------------------------------------------------

def describe_validation_error(errors: list[dict]) -> tuple[str, str, str | None]:
    """(message, type, param) for pydantic errors: the first bad field, with every rule it broke."""
    if not errors:
        return "invalid request", "invalid_request_error", None
    if errors[0].get("type") == "json_invalid":
        return f"The request body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}", \
            "invalid_request_error", None

    def path(err) -> list[str]:  # drop "body" and union-branch tags such as "str" or "list[int]"
        return [str(x) for x in err.get("loc", ()) if x != "body" and not (isinstance(x, str) and (
            "[" in x or x in ("str", "int", "float", "bool", "function-after")))]

    first = path(errors[0])
    if not first:
        return "The request body must be a JSON object (sent with Content-Type: application/json).", \
            "invalid_request_error", None
    param = first[0]
    msgs = list(dict.fromkeys(err["msg"] for err in errors if (path(err)[:1] or [None])[0] == param))
    return f"{'.'.join(first)}: {'; or '.join(msgs[:3])}", "invalid_request_error", param


def _token_text(tok, token_id: int, lp) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else tok.decode([token_id])


def legacy_logprobs(tok, ids: list[int], position_lps: list, offset: int) -> dict:
    """OpenAI's legacy completions logprobs block for `ids` (position_lps[i]: dict id -> Logprob, or None)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, d in zip(ids, list(position_lps) + [None] * (len(ids) - len(position_lps))):
        s = _token_text(tok, t, d.get(t) if d else None)
        out["tokens"].append(s)
        out["token_logprobs"].append(d[t].logprob if d and t in d else None)
        out["top_logprobs"].append({_token_text(tok, k, v): v.logprob for k, v in d.items()} if d else None)
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def join_legacy(a: dict, b: dict | None) -> dict:
    """Concatenate two legacy logprobs blocks (prompt, then completion)."""
    return {k: a[k] + b[k] for k in a} if b else a


def chat_logprobs(tok, ids: list[int], position_lps: list | None, top_n: int) -> dict:
    """The chat `logprobs` object: per token its text, logprob, UTF-8 bytes and the top_n alternatives."""
    content = []
    for t, d in zip(ids, position_lps or []):
        s = _token_text(tok, t, d.get(t))
        top = sorted(d.items(), key=lambda kv: -kv[1].logprob)[:top_n]
        content.append({"token": s, "logprob": d[t].logprob, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": (ts := _token_text(tok, k, v)), "logprob": v.logprob,
                                          "bytes": list(ts.encode())} for k, v in top]})
    return {"content": content}
