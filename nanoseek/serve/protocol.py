"""The OpenAI wire format: request models, error bodies, SSE framing.

Key choices:
- Requests are pydantic models that ignore unknown fields (OpenAI clients send many: `user`,
  `logit_bias`, `tools`, ...); ranges are declared on the fields so a 400 names the bad parameter.
  Floats must be finite (JSON's non-standard `Infinity`/`NaN` parse, then fail on their field).
- The body is read and parsed here, not by FastAPI, so that the API key is checked before a byte of it
  is read (FastAPI reads a declared body before running dependencies), its size is bounded from
  Content-Length and again while it streams in, and every JSON failure (not UTF-8, invalid, too
  deeply nested, a 5000-digit number) is a 4xx.
- Every string the server uses is `Text`: a lone UTF-16 surrogate (JSON's "\\ud800" escape parses to
  one; no tokenizer or UTF-8 encoder accepts it) is a 400 naming its field. Free-form JSON the server passes
  to the chat template (tool `parameters`, `chat_template_kwargs`) is held to the same rules throughout:
  surrogate-free strings and keys, finite numbers.
- Chat requests carry OpenAI's `tools` / `tool_choice`, messages with `tool_calls`, `tool` results and
  `reasoning_content`, and vLLM's `chat_template_kwargs` (e.g. {"thinking": true} for DeepSeek-V3.1).
- ServerLimits holds the policies a request is held to (body size, stop lists), with the defaults of
  vLLM and the OpenAI API.
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
import math
import re
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request


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


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(s: str) -> str:
    # JSON's "\\ud800" escape parses to a Python str that no tokenizer or UTF-8 encoder accepts
    if not s.isascii() and _SURROGATE.search(s):
        raise ValueError("the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is "
                         "not valid Unicode")
    return s


Text = Annotated[str, AfterValidator(_unicode)]  # every string of a request that the server uses


def _json_value(value):
    """Free-form JSON (walked without recursion, however deep): Text strings and keys, finite numbers."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            _unicode(v)
        elif isinstance(v, float) and not math.isfinite(v):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
        elif isinstance(v, dict):
            for k, x in v.items():
                _unicode(k)
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
    return value


JSONObject = Annotated[dict[str, Any], AfterValidator(_json_value)]
_RESERVED_TEMPLATE_VARIABLES = ("messages", "tools", "documents", "add_generation_prompt")


def _template_kwargs(kwargs: dict) -> dict:
    taken = [k for k in _RESERVED_TEMPLATE_VARIABLES if k in kwargs]
    if taken:
        raise ValueError(f"{taken} are set by the request itself, not through chat_template_kwargs")
    return kwargs


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: Text | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: Text | list[Text] | None = None
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

    prompt: Text | list[int] | list[Text | list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Text
    arguments: Text


class ToolCallParam(BaseModel):
    """A call in an earlier assistant message (OpenAI's shape; `arguments` is a JSON string)."""

    model_config = ConfigDict(extra="ignore")
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Text = Field(min_length=1)
    description: Text | None = None
    parameters: JSONObject | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Text


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: ToolName


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: Text | None = None
    reasoning_content: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it (a `developer` message is a system message)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        for key in ("tool_call_id", "name", "reasoning_content"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions; `max_completion_tokens` wins over the deprecated `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: Annotated[JSONObject, AfterValidator(_template_kwargs)] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages for the chat template (a `developer` message is a system message)."""
        return [m.for_template() for m in self.messages]

    def tool_dicts(self) -> list[dict] | None:
        """The tools as the chat template sees them (fields the client left out stay out)."""
        return None if self.tools is None else [t.model_dump(exclude_none=True) for t in self.tools]


# ---- reading a request -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server; each is a `nanoseek serve` flag of the same name.

    Attributes:
        max_body_bytes: largest request body, refused with 413 from its Content-Length or as soon as the
            bytes read pass it, before any JSON parsing. 32 MiB: vLLM's Rust front end's cap (vLLM #46582;
            its Python front end has none), room for a batch of full-context token-id prompts.
        max_stop_strings: most `stop` strings per request. 4: the OpenAI API's limit, which vLLM enforces
            too (vLLM #51447); the engine thread scans every stop string after every token.
        max_stop_length: longest `stop` string in characters. 240: vLLM's TGIS front end's
            MAX_STOP_SEQ_LENGTH (neither the OpenAI API nor vLLM's OpenAI server documents one); a stop
            string this long also holds back as many characters of every streamed delta.
        max_stop_token_ids: most `stop_token_ids` per request. 128: vLLM's proposed VLLM_MAX_STOP_TOKEN_IDS
            (vLLM #54721); OpenAI has no such field.
    """

    max_body_bytes: int = 32 * 1024 * 1024
    max_stop_strings: int = 4
    max_stop_length: int = 240
    max_stop_token_ids: int = 128

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerLimits.{f.name} must be an int >= 1; got {value!r}")

    def check(self, data: dict) -> None:
        """Refuse a parsed JSON request whose stop lists break the limits: on the raw JSON, so that a
        million stop strings are refused before each one is validated."""
        stop = data.get("stop")
        stop = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if len(stop) > self.max_stop_strings:
            raise APIError(400, f"stop: at most {self.max_stop_strings} stop strings are allowed; got {len(stop)}.",
                           param="stop")
        longest = max((len(s) for s in stop if isinstance(s, str)), default=0)
        if longest > self.max_stop_length:
            raise APIError(400, f"stop: a stop string may be at most {self.max_stop_length} characters long; got "
                           f"one of {longest}.", param="stop")
        ids = data.get("stop_token_ids")
        if isinstance(ids, list) and len(ids) > self.max_stop_token_ids:
            raise APIError(400, f"stop_token_ids: at most {self.max_stop_token_ids} ids are allowed; got {len(ids)}.",
                           param="stop_token_ids")


async def read_body(raw: Request, max_bytes: int) -> bytearray:
    """The request body, refused (413) once it is known to exceed `max_bytes`: from Content-Length before
    reading, else as soon as the bytes streamed in pass it (a chunked upload has no Content-Length)."""
    media = (raw.headers.get("content-type") or "application/json").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise APIError(415, f"Content-Type must be application/json; got {media[:100]!r}.",
                       code="unsupported_media_type")
    too_big = f"The request body exceeds this server's limit of {max_bytes} bytes."
    length = raw.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise APIError(413, too_big, code="request_too_large")
    body = bytearray()
    try:
        async for chunk in raw.stream():
            body += chunk
            if len(body) > max_bytes:
                raise APIError(413, too_big, code="request_too_large")
    except ClientDisconnect:
        raise APIError(499, "client disconnected") from None
    return body


def parse_request(body: bytes | bytearray, model: type[BaseModel], limits: ServerLimits) -> BaseModel:
    """Parse a JSON body, hold it to `limits` and validate it as `model`; every failure is an APIError
    400 naming what it can.

    CPU work for a worker thread when the body is big (json.loads holds the GIL throughout, about
    40 ms per MB of small numbers on a slow core, which bounds how long a big body stalls others).
    """
    try:  # strict UTF-8 (RFC 8259): no surrogate code points encoded as bytes
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"The request body is not valid UTF-8: byte {e.start} cannot be decoded.") from None
    if not text.strip():
        raise APIError(400, "The request body is empty; send a JSON object.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply to parse.") from None
    except ValueError as e:  # Python refuses to convert integers of more than 4300 digits
        raise APIError(400, f"The request body holds a number too long to read: {str(e).split(';')[0]}.") from None
    if isinstance(data, dict):
        limits.check(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, kind, param = describe_validation_error(e.errors(include_url=False, include_input=False))
        raise APIError(400, message, kind, param) from None


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
    mine = [err for err in errors if (path(err)[:1] or [None])[0] == param]
    # a value of the right type that breaks a rule (a lone surrogate in a str) says more than the
    # other union branches' "Input should be a valid list"
    ruled = [err for err in mine if err.get("type") == "value_error"]
    if ruled:
        first, mine = path(ruled[0]), ruled
    msgs = list(dict.fromkeys(err["msg"].removeprefix("Value error, ") for err in mine))
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
