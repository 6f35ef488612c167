"""Tokenizers: any HF tokenizer folder (DeepSeek's releases included), and nanoseek's own byte-level BPE.

`Tokenizer` is an HF fast tokenizer (a `tokenizers` backend), its named special tokens and its chat templates;
`Tokenizer.load` reads any folder `transformers.AutoTokenizer` reads through tokenizer.json, with the same ids
and the same chat prompts (nanoseek/data/tokenizer_files.py, nanoseek/data/chat_template.py;
docs/design/tokenizers.md). The tokenizer nanoseek trains is one such folder.

nanoseek's own tokenizer (`train_tokenizer`):
- The `tokenizers` library does the work (the field's standard; `transformers` reads the same
  tokenizer.json). Byte-level BPE never needs an unknown token, so encode/decode is lossless for any
  unicode text. Digits are split one per token before the byte-level split, which helps small
  models learn arithmetic (as in Llama/DeepSeek-style tokenizers that cap digit runs); a number's
  first digit keeps the space before it (" 13" -> " 1", "3"), so a digit token's predecessor is the
  operator or word before the number, not a space shared by every number: a tiny model learns to copy
  a question's numbers (induction: find the previous token, copy what followed) far sooner.
- Fixed low ids: 0 `<|begin_of_sentence|>` (BOS), 1 `<|end_of_sentence|>` (EOS), 2 `<|pad|>`,
  3 `<|User|>`, 4 `<|Assistant|>` (special: dropped by decode(skip_special_tokens=True)), then
  5-8 `<think>` `</think>` `<answer>` `</answer>` (added but not special, so they survive that decode).
  BOS=0/EOS=1 match ModelConfig's defaults. The names are ASCII versions of DeepSeek's
  `<｜begin▁of▁sentence｜>` etc.
- No post-processor: `encode` adds no BOS/EOS; the data pipeline adds them per document and the chat
  template writes BOS itself, so ids agree with `transformers` with or without `add_special_tokens`.
- `save` writes `tokenizer.json` and `tokenizer_config.json` (special tokens, model_max_length, a jinja2 chat
  template in the DeepSeek-R1 layout) next to config.json/safetensors.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator, Mapping, Sequence

import jinja2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

from ..checkpoint import CheckpointError
from ..files import atomic_write_text
from .chat_template import ChatTemplates
from .r1_format import ANSWER, END_ANSWER, END_THINK, THINK
from .tokenizer_files import (CONFIG_FILE, DEFAULT_MAX_LENGTH, SPECIAL_TOKEN_NAMES,  # noqa: F401
                              SPECIAL_TOKENS_MAP_FILE, TEMPLATE_FILE, TOKENIZER_FILE, read_folder)

BOS, EOS, PAD, USER, ASSISTANT = ("<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>", "<|User|>",
                                  "<|Assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)
REASONING_TOKENS = (THINK, END_THINK, ANSWER, END_ANSWER)
NANOSEEK_SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}  # what train_tokenizer names

# DeepSeek-R1 layout: BOS, system text, then <|User|>q<|Assistant|>a<|end_of_sentence|> per turn.
# Unlike the released R1 template it keeps <think> blocks of earlier turns and does not pre-fill
# "<think>\n" after the generation prompt: our SFT targets begin with "<think>" themselves.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] != 'system' %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")


class Tokenizer:
    """An HF fast tokenizer: a `tokenizers` backend, its named special tokens and its chat templates.

    Args:
        backend: a `tokenizers.Tokenizer`.
        chat_template: jinja2 source rendered by `apply_chat_template`, name -> source for several named templates,
            or None (chat then raises, naming the folder).
        model_max_length: longest sequence the model is meant to see (written to tokenizer_config.json).
        special_tokens: the named special tokens ({"bos_token": ..., "eos_token": ..., "pad_token": ...}; keys from
            SPECIAL_TOKEN_NAMES), each in the backend's vocabulary. Default: the ones train_tokenizer names.
        name: where the tokenizer came from (a folder), for error messages.
    """

    def __init__(self, backend: _Backend, chat_template: str | Mapping[str, str] | None = CHAT_TEMPLATE,
                 model_max_length: int = DEFAULT_MAX_LENGTH, special_tokens: Mapping[str, str] | None = None,
                 name: str | None = None):
        special = dict(NANOSEEK_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        unknown = sorted(set(special) - set(SPECIAL_TOKEN_NAMES))
        if unknown:
            raise ValueError(f"unknown special token names {unknown}; expected some of {list(SPECIAL_TOKEN_NAMES)}")
        missing = [t for t in special.values() if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.backend = backend
        self.special_tokens = {k: special[k] for k in SPECIAL_TOKEN_NAMES if special.get(k)}  # transformers' order
        self.model_max_length = model_max_length
        self.name = name
        self.templates = ChatTemplates(chat_template) if chat_template else None

    @property
    def chat_template(self) -> str | None:
        """The source of the template used when none is named (None when the tokenizer has no template)."""
        if self.templates is None:
            return None
        sources = self.templates.sources
        return sources.get("default", next(iter(sources.values())) if len(sources) == 1 else None)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the model's embedding needs at least this many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_id(self) -> int | None:
        """Id of the BOS token; None when the tokenizer names none (likewise eos_id, pad_id)."""
        return self._id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad_token")

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    def special_id(self, name: str, needed_for: str) -> int:
        """The id of named special token `name` ("bos_token", "eos_token", "pad_token", ...); a ValueError naming
        the folder and `needed_for` (what needs the token) when the tokenizer names none."""
        token_id = self._id(name)
        if token_id is None:
            where = f" in {self.name}" if self.name else ""
            raise ValueError(f"the tokenizer{where} names no {name} ({CONFIG_FILE} or {SPECIAL_TOKENS_MAP_FILE}); "
                             f"{needed_for} needs one")
        return token_id

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text become their ids. add_special_tokens=True runs
        tokenizer.json's post-processor (e.g. a BOS in front), as transformers' `encode(text)` does."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust backend, which releases the GIL)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; by default every token (special ones too) is kept, so decode(encode(t)) == t."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def require_chat_template(self) -> None:
        """Raise ValueError, naming the folder, when the tokenizer has no chat template (chat cannot work)."""
        if self.templates is None:
            where = f" in {self.name}" if self.name else ""
            raise ValueError(f"the tokenizer has no chat template{where} (no chat_template in {CONFIG_FILE}, no "
                             f"{TEMPLATE_FILE}); chat needs one")

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
                            chat_template: str | None = None, **template_kwargs) -> str:
        """Render `messages` ([{"role", "content", ...}, ...]) as prompt text, as transformers'
        `apply_chat_template(..., tokenize=False)` does on the same folder (token ids: `encode` the text).

        Args:
            add_generation_prompt: end with the assistant's turn opening (R1's also opens its think block).
            tools: OpenAI-style tool schemas ({"type": "function", "function": {...}}), for templates that read them.
            documents: retrieval documents, for templates that read them.
            chat_template: the name of one of the tokenizer's templates (default: "tool_use" when tools are
                given and it exists, else "default").
            template_kwargs: more template variables, e.g. thinking=True for DeepSeek-V3.1.
        Raises ValueError when the tokenizer has no chat template, jinja2's TemplateError when rendering fails.
        """
        self.require_chat_template()
        return self.templates.render(messages, self.special_tokens, add_generation_prompt=add_generation_prompt,
                                     tools=tools, documents=documents, name=chat_template, **template_kwargs)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory` (created if needed).

        Other files there (config.json, weights) are left alone; each file is replaced atomically.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens,
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # spaces are part of the bytes: keep decode lossless
            "model_max_length": self.model_max_length,
        }
        if self.templates is not None:
            sources = self.templates.sources
            config["chat_template"] = (sources["default"] if list(sources) == ["default"] else
                                       [{"name": k, "template": v} for k, v in sources.items()])
        atomic_write_text(os.path.join(directory, TOKENIZER_FILE), self.backend.to_str(pretty=True))
        atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read an HF tokenizer folder: one written by `save`, or a released model's (tokenizer_files.py).

        Raises FileNotFoundError when the folder or its tokenizer.json is missing, CheckpointError naming the
        file when one is unreadable: a tokenizer.json the `tokenizers` library rejects or that lacks a special
        token its config names, a tokenizer_config.json that is not a JSON object, a chat template with a syntax
        error. Templates are compiled here, not at their first use as transformers does, so a server or a
        training run fails at start rather than on its first chat.
        """
        args = read_folder(directory)
        files = args.pop("template_files")
        try:
            return cls(**args)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"{files.get(e.name, e.name)}: chat_template line {e.lineno}: {e.message}") from None
        except ValueError as e:
            raise CheckpointError(f"{os.path.join(os.fspath(directory), TOKENIZER_FILE)}: {e}") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                    model_max_length: int = DEFAULT_MAX_LENGTH) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`.

    Args:
        texts: any iterable of strings (streamed once).
        vocab_size: target size including the 256 byte tokens and the 9 added tokens; a small corpus
            may stop short of it (read `.vocab_size` for the real count).
        min_frequency: a pair must occur this often to be merged.
        model_max_length: recorded in tokenizer_config.json.
    """
    floor = 256 + len(SPECIAL_TOKENS) + len(REASONING_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be >= {floor} (256 bytes + added tokens), got {vocab_size}")
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[AddedToken(t, normalized=False) for t in SPECIAL_TOKENS + REASONING_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_without_added_tokens(texts), trainer)
    # The trainer marks every added token special; the reasoning tags must not be (see module doc).
    spec = json.loads(backend.to_str())
    for tok in spec["added_tokens"]:
        tok["special"] = tok["content"] in SPECIAL_TOKENS
    return Tokenizer(_Backend.from_str(json.dumps(spec)), model_max_length=model_max_length,
                     special_tokens=NANOSEEK_SPECIAL_TOKENS)


_ADDED_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + REASONING_TOKENS))


def _without_added_tokens(texts: Iterable[str]) -> Iterator[str]:
    """Cut the added-token strings out of training text so no merges are spent spelling them."""
    for text in texts:
        yield from (piece for piece in _ADDED_RE.split(text) if piece)


