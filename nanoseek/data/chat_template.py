"""Chat templates: Jinja sources rendered the way `transformers` renders them (same text, hence same ids).

Key choices (docs/design/tokenizers.md, "Chat templates"):
- The environment is transformers' (`utils/chat_template_utils.py`, 5.x): a sandboxed, immutable Jinja
  environment with `trim_blocks`, `lstrip_blocks` and the `loopcontrols` extension; `raise_exception`,
  `strftime_now`, a `dict` constructor and a `namespace` that refuses underscore names; a `tojson` filter
  that keeps non-ASCII text (Jinja's own escapes HTML); and the `{% generation %}` tag (transformers uses it
  to mark assistant tokens; here it renders its body).
- The variables are transformers': `messages`, `tools`, `documents`, `add_generation_prompt`, the named
  special tokens (`bos_token`, `eos_token`, ... as strings), then the caller's template kwargs, which win
  (V3.1's `thinking`). Messages are normalized first as transformers does: keys whose value is None are
  dropped, and a reasoning text under `reasoning_content`, `thinking` or `reasoning` is copied under the first
  two names.
- A folder may hold several named templates (`tool_use`, ...): without a name, `tool_use` is chosen when tools
  are passed and it exists, else `default`. Every template is compiled when the tokenizer loads, so a syntax
  error stops a server at start, not at its first chat.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

DEFAULT = "default"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, standard name first


class ChatTemplates:
    """The named chat templates of a tokenizer, compiled.

    Args:
        templates: template source, or name -> source (a single template is named "default").
    Raises jinja2.TemplateSyntaxError (with its `name` set to the template's name) for a source that does not compile.
    """

    def __init__(self, templates: str | Mapping[str, str]):
        self.sources = {DEFAULT: templates} if isinstance(templates, str) else dict(templates)
        env = _environment()
        self._compiled = {}
        for name, source in self.sources.items():
            try:
                self._compiled[name] = env.from_string(source)
            except jinja2.TemplateSyntaxError as e:
                e.name = name
                raise

    def select(self, name: str | None = None, tools: Sequence | None = None) -> str:
        """The name of the template to use (transformers' `get_chat_template` rule)."""
        if name is not None:
            if name not in self.sources:
                raise ValueError(f"no chat template named {name!r}; this tokenizer has {sorted(self.sources)}")
            return name
        if tools is not None and "tool_use" in self.sources:
            return "tool_use"
        if DEFAULT in self.sources:
            return DEFAULT
        if len(self.sources) == 1:
            return next(iter(self.sources))
        raise ValueError(f"this tokenizer has several chat templates and none named 'default': pass one of "
                         f"{sorted(self.sources)}")

    def render(self, messages: Sequence[Mapping[str, Any]], special_tokens: Mapping[str, str],
               add_generation_prompt: bool = True, tools: Sequence[Mapping] | None = None,
               documents: Sequence[Mapping] | None = None, name: str | None = None, **kwargs) -> str:
        """The prompt text of `messages`; `special_tokens` are the named tokens (bos_token=...); kwargs win over
        them."""
        template = self._compiled[self.select(name, tools)]
        return template.render(messages=normalize_messages(messages), tools=_plain(tools),
                               documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                               **{**special_tokens, **_plain(kwargs)})


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """transformers' message normalization: plain dicts, None values dropped, reasoning aliased."""
    out = []
    for message in messages:
        if hasattr(message, "model_dump"):  # a pydantic message (e.g. from the openai client)
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts; got {message!r}")
        message = {key: _plain(value) for key, value in message.items() if value is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value):
    """A copy made of plain JSON types (the template sees no caller objects; pydantic models are dumped)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body (transformers records where it falls)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() without underscore attributes (a way into Python internals)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r}) "
                                                  "on a namespace")


class _Dict:
    """dict(...) and dict.fromkeys(...) for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt), dict=_Dict(),
                       namespace=_Namespace)
    return env
