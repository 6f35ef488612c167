"""Byte-level BPE tokenizer: train it, save it as HF files, load it back, render chat prompts.

Key choices:
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
- `encode` never adds BOS/EOS (there is no post-processor): the data pipeline adds them per document
  and the chat template writes BOS itself, so ids agree with `transformers` with or without
  `add_special_tokens`.
- `save` writes `tokenizer.json` and `tokenizer_config.json` (bos/eos/pad tokens, model_max_length,
  a jinja2 chat template in the DeepSeek-R1 layout) next to config.json/safetensors, so a checkpoint
  folder loads with `transformers.AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

from ..checkpoint import CheckpointError
from ..files import atomic_write_text, read_json, read_text
from .r1_format import ANSWER, END_ANSWER, END_THINK, THINK

BOS, EOS, PAD, USER, ASSISTANT = ("<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>", "<|User|>",
                                  "<|Assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)
REASONING_TOKENS = (THINK, END_THINK, ANSWER, END_ANSWER)
DEFAULT_MAX_LENGTH = 4096
TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"

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
    """A trained byte-level BPE tokenizer plus its chat template.

    Args:
        backend: a `tokenizers.Tokenizer` that contains the SPECIAL_TOKENS.
        chat_template: jinja2 source rendered by `apply_chat_template`.
        model_max_length: longest sequence the model is meant to see (written to tokenizer_config.json).
    """

    def __init__(self, backend: _Backend, chat_template: str = CHAT_TEMPLATE,
                 model_max_length: int = DEFAULT_MAX_LENGTH):
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.backend = backend
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(  # the environment transformers renders with
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(chat_template)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the model's embedding needs at least this many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.backend.token_to_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.backend.token_to_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.backend.token_to_id(PAD)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added. Special-token strings in the text become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; by default every token (special ones too) is kept, so decode(encode(t)) == t."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]) as text.

        Same output as `transformers`' `apply_chat_template(..., tokenize=False)` on the saved folder.
        add_generation_prompt appends `<|Assistant|>` so the model continues as the assistant.
        """
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=BOS, eos_token=EOS, pad_token=PAD)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory` (created if needed).

        Other files there (config.json, weights) are left alone; each file is replaced atomically.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # spaces are part of the bytes: keep decode lossless
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
        }
        atomic_write_text(os.path.join(directory, TOKENIZER_FILE), self.backend.to_str(pretty=True))
        atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read a folder written by `save` (or any HF folder with a byte-level tokenizer.json and our tokens).

        Raises FileNotFoundError when the folder or its tokenizer.json is missing, CheckpointError naming the
        file when one is unreadable: a tokenizer.json the `tokenizers` library rejects or that lacks our special
        tokens, a tokenizer_config.json that is not a JSON object, a chat template with a syntax error. The
        template is compiled here, not at its first use as transformers does, so a server or a training run
        fails at start rather than on its first chat.
        """
        directory = os.fspath(directory)
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory!r}: train one with "
                                    f"nanoseek.data.train_tokenizer(texts, vocab_size) and .save() it there")
        text = read_text(path, error=CheckpointError)
        try:
            backend = _Backend.from_str(text)
        except Exception as e:  # the Rust library raises a bare Exception naming only the JSON position
            raise CheckpointError(f"{path}: not a readable tokenizer ({e})") from None
        config: dict = {}
        config_path = os.path.join(directory, CONFIG_FILE)
        if os.path.isfile(config_path):
            config = read_json(config_path, error=CheckpointError)
        template, source = config.get("chat_template"), config_path
        jinja_path = os.path.join(directory, TEMPLATE_FILE)  # where newer transformers versions save it
        if not template and os.path.isfile(jinja_path):
            template, source = read_text(jinja_path, error=CheckpointError), jinja_path
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{source}: chat_template must be a string (named template lists are not "
                                  "supported)")
        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, (int, float)) or isinstance(max_length, bool) or max_length < 1:
            raise CheckpointError(f"{config_path}: model_max_length must be a positive number (got {max_length!r})")
        try:
            return cls(backend, chat_template=template or CHAT_TEMPLATE, model_max_length=int(max_length))
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"{source}: chat_template line {e.lineno}: {e.message}") from None
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None


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
    return Tokenizer(_Backend.from_str(json.dumps(spec)), model_max_length=model_max_length)


_ADDED_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + REASONING_TOKENS))


def _without_added_tokens(texts: Iterable[str]) -> Iterator[str]:
    """Cut the added-token strings out of training text so no merges are spent spelling them."""
    for text in texts:
        yield from (piece for piece in _ADDED_RE.split(text) if piece)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)

