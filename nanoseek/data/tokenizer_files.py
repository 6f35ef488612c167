"""Reading an HF tokenizer folder: `tokenizer.json`, the special tokens, the chat templates, the length limit.

The rules are transformers' (5.x `tokenization_utils_base.py`), so a folder means the same here as to
`AutoTokenizer.from_pretrained` (docs/design/tokenizers.md, "Folders"):
- `tokenizer.json` (the `tokenizers` library's file) is the tokenizer; encoding adds BOS/EOS only through its
  post-processor, never because of `add_bos_token` in tokenizer_config.json (ignored when tokenizer.json exists).
- The named special tokens (bos, eos, unk, sep, pad, cls, mask) come from `tokenizer_config.json`, as strings or
  as `{"__type": "AddedToken", "content": ...}` objects; `special_tokens_map.json` overrides them when the
  config has no `added_tokens_decoder` (how older transformers versions saved them).
- Chat templates: `chat_template.jinja` and `additional_chat_templates/*.jinja`, when any exists, replace the
  config's `chat_template` (a string, or a list of `{"name", "template"}`).
Errors name the file: CheckpointError for an unreadable file, FileNotFoundError when there is no tokenizer.json.
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer as Backend

from ..checkpoint import CheckpointError
from ..files import read_json, read_text

TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"
SPECIAL_TOKENS_MAP_FILE, TEMPLATE_DIR = "special_tokens_map.json", "additional_chat_templates"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULT_MAX_LENGTH = 4096


def read_folder(directory: str | os.PathLike) -> dict:
    """The Tokenizer constructor's arguments for HF tokenizer folder `directory`: backend, special_tokens,
    chat_template (None, a source, or name -> source), model_max_length, name; plus `template_files`
    (template name -> the file it came from, for error messages)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory!r}: nanoseek reads HF fast-tokenizer folders; "
                                f"train one with nanoseek.data.train_tokenizer(texts, vocab_size) and .save() it there")
    text = read_text(path, error=CheckpointError)
    try:
        backend = Backend.from_str(text)
    except Exception as e:  # the Rust library raises a bare Exception naming only the JSON position
        raise CheckpointError(f"{path}: not a readable tokenizer ({e})") from None
    config_path = os.path.join(directory, CONFIG_FILE)
    config = read_json(config_path, error=CheckpointError) if os.path.isfile(config_path) else {}
    special = {name: _content(config[name], config_path, name) for name in SPECIAL_TOKEN_NAMES if config.get(name)}
    map_path = os.path.join(directory, SPECIAL_TOKENS_MAP_FILE)
    if "added_tokens_decoder" not in config and os.path.isfile(map_path):
        tokens = read_json(map_path, error=CheckpointError)
        special.update({name: _content(tokens[name], map_path, name) for name in SPECIAL_TOKEN_NAMES
                        if tokens.get(name)})
    templates, files = _templates(directory, config, config_path)
    max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
    if not isinstance(max_length, (int, float)) or isinstance(max_length, bool) or max_length < 1:
        raise CheckpointError(f"{config_path}: model_max_length must be a positive number (got {max_length!r})")
    return dict(backend=backend, special_tokens=special, chat_template=templates,
                model_max_length=int(min(max_length, 2**63 - 1)), name=directory, template_files=files)


def _content(value, file: str, name: str) -> str:
    """A special token's text: a string, or an AddedToken object's "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"{file}: {name} must be a token string or an AddedToken object with a \"content\" "
                              f"string (got {value!r})")
    return value


def _templates(directory: str, config: dict, config_path: str) -> tuple:
    """(None, a single source, or name -> source; name -> the file each came from)."""
    found, files = {}, {}
    jinja_path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(jinja_path):
        found["default"], files["default"] = read_text(jinja_path, error=CheckpointError), jinja_path
    extra = os.path.join(directory, TEMPLATE_DIR)
    if os.path.isdir(extra):
        for entry in sorted(os.listdir(extra)):
            if entry.endswith(".jinja"):
                name, file = entry.removesuffix(".jinja"), os.path.join(extra, entry)
                found[name], files[name] = read_text(file, error=CheckpointError), file
    if found:  # template files win over the config's entry, as in transformers
        return (found["default"] if list(found) == ["default"] else found), files
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template or None, {"default": config_path}
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                          and isinstance(t.get("template"), str) for t in template):
        named = {t["name"]: t["template"] for t in template}
        return named, {name: config_path for name in named}
    raise CheckpointError(f"{config_path}: chat_template must be a string or a list of {{\"name\", \"template\"}} "
                          "objects")
