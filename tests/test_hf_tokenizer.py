"""HF tokenizer folders laid out like DeepSeek's releases: ids, chat prompts and errors against transformers.

The folders are made here (tests/deepseek_folder.py): a small byte-level BPE with DeepSeek's full-width special
tokens, tokenizer_config.json with AddedToken objects and an R1-like template, V3.1's `thinking` template, named
templates and the other places transformers finds templates and special tokens.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from deepseek_folder import (BOS, CALL_BEGIN, END_THINK, EOS, R1_TEMPLATE, SEP, THINK, TOOL_ARGUMENTS, USER,
                             V31_TEMPLATE, WEATHER_TOOL, write_tokenizer)
from nanoseek import CheckpointError
from nanoseek.data import Tokenizer

TEXTS = ["Hello world 12345", f"{BOS}a{EOS}", f"{USER}q <think>x</think> y", f"{CALL_BEGIN}f{SEP}{{}}", "",
         "naïve 日本語 😀 \n\t  spaces", "</think>"]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": TOOL_ARGUMENTS}}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
     {"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nhello"},
     {"role": "user", "content": "again <think>?"}],
    [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]},
     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "tool", "content": "22C"},
     {"role": "assistant", "content": "Sunny, 22C.", "reasoning_content": "read the tools"}],
]


@pytest.fixture(scope="module")
def transformers(transformers_mod):
    return transformers_mod


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds_tok")
    write_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def pair(folder, transformers):
    return Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)


def _copy(folder, tmp_path, name="copy") -> str:
    d = tmp_path / name
    shutil.copytree(folder, d)
    return str(d)


def _edit_config(d, **changes):
    path = os.path.join(d, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del config[k]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)


def _hf_ids(hf, messages, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---- ids -------------------------------------------------------------------------------------------

def test_special_tokens_and_ids_match_transformers(pair):
    tok, hf = pair
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, EOS)  # AddedToken objects in the config
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 1)
    assert tok.vocab_size == len(hf) and tok.model_max_length == 16384
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text), text  # the post-processor's BOS
        assert tok.encode_batch([text, text], add_special_tokens=True) == [hf.encode(text)] * 2
        ids = hf.encode(text)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.encode(f"{THINK}{END_THINK}") == [tok.token_to_id(THINK), tok.token_to_id(END_THINK)]
    assert tok.decode(tok.encode(f"{BOS}<think>a</think>{EOS}"), skip_special_tokens=True) == "<think>a</think>"


# ---- chat prompts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]], ids=["no-tools", "tools"])
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "no-gen"])
def test_r1_chat_prompt_text_and_ids_match_transformers(pair, conv, tools, gen):
    tok, hf = pair
    messages = CONVERSATIONS[conv]
    text = tok.apply_chat_template(messages, add_generation_prompt=gen, tools=tools)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, tools=tools)
    assert tok.encode(text) == _hf_ids(hf, messages, add_generation_prompt=gen, tools=tools)
    assert text.startswith(BOS) and text.endswith("<｜Assistant｜><think>\n") == gen


def test_r1_template_drops_earlier_reasoning_and_prefills_think(pair):
    tok, _ = pair
    text = tok.apply_chat_template(CONVERSATIONS[1])
    assert text == (f"{BOS}Be brief.\n\nBe kind.{USER}hi<｜Assistant｜>\n\nhello{EOS}{USER}again <think>?"
                    "<｜Assistant｜><think>\n")


@pytest.mark.parametrize("kwargs, tail", [({}, "</think>"), ({"thinking": False}, "</think>"),
                                          ({"thinking": True}, "<think>")], ids=["default", "off", "on"])
def test_v31_thinking_kwarg_matches_transformers(tmp_path, transformers, kwargs, tail):
    write_tokenizer(tmp_path, V31_TEMPLATE)
    tok, hf = Tokenizer.load(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, **kwargs)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        assert tok.encode(text) == _hf_ids(hf, messages, add_generation_prompt=True, **kwargs)
        assert text.endswith("<｜Assistant｜>" + tail)


def test_named_templates_and_template_files_follow_transformers(folder, tmp_path, transformers):
    plain = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tool_use = "{{ bos_token }}TOOLS {{ tools | tojson }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    named = _copy(folder, tmp_path, "named")  # a list of {"name", "template"} in tokenizer_config.json
    _edit_config(named, chat_template=[{"name": "default", "template": plain},
                                       {"name": "tool_use", "template": tool_use}])
    files = _copy(folder, tmp_path, "files")  # chat_template.jinja + additional_chat_templates/ win over the config
    os.makedirs(os.path.join(files, "additional_chat_templates"))
    with open(os.path.join(files, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(plain)
    with open(os.path.join(files, "additional_chat_templates", "tool_use.jinja"), "w", encoding="utf-8") as f:
        f.write(tool_use)
    messages = [{"role": "user", "content": "héllo"}]
    for d in (named, files):
        tok, hf = Tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d)
        assert sorted(tok.templates.sources) == ["default", "tool_use"] and tok.chat_template == plain
        for tools, name in [(None, None), ([WEATHER_TOOL], None), (None, "tool_use"), ([WEATHER_TOOL], "default")]:
            ours = tok.apply_chat_template(messages, tools=tools, chat_template=name)
            assert ours == hf.apply_chat_template(messages, tools=tools, chat_template=name, tokenize=False,
                                                  add_generation_prompt=True)
        assert tok.apply_chat_template(messages, tools=[WEATHER_TOOL]).startswith(f"{BOS}TOOLS [")
        with pytest.raises(ValueError, match="no chat template named 'nope'"):
            tok.apply_chat_template(messages, chat_template="nope")
    resaved = tmp_path / "resaved"  # named templates survive save -> load, for transformers too
    Tokenizer.load(named).save(resaved)
    assert transformers.AutoTokenizer.from_pretrained(str(resaved)).apply_chat_template(
        messages, tools=[WEATHER_TOOL], tokenize=False) == Tokenizer.load(resaved).apply_chat_template(
        messages, tools=[WEATHER_TOOL], add_generation_prompt=False)


def test_special_tokens_map_json_overrides_the_config(folder, tmp_path, transformers):
    d = _copy(folder, tmp_path)
    _edit_config(d, eos_token=None, pad_token=None)
    with open(os.path.join(d, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": {"content": EOS, "lstrip": False}, "pad_token": "<｜▁pad▁｜>"}, f,
                  ensure_ascii=False)
    tok, hf = Tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d)
    assert (tok.eos_id, tok.pad_id) == (hf.eos_token_id, hf.pad_token_id) == (1, 2)
    assert tok.apply_chat_template(CONVERSATIONS[1]) == hf.apply_chat_template(CONVERSATIONS[1], tokenize=False,
                                                                               add_generation_prompt=True)


def test_save_load_round_trip_keeps_tokens_and_template(pair, tmp_path, transformers):
    tok, _ = pair
    tok.save(tmp_path)
    back, hf = Tokenizer.load(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert back.special_tokens == tok.special_tokens and back.chat_template == R1_TEMPLATE
    for text in TEXTS:
        with_bos = hf.encode(text)
        assert back.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True) == with_bos
    assert back.apply_chat_template(CONVERSATIONS[2]) == tok.apply_chat_template(CONVERSATIONS[2])


def test_template_sandbox_matches_transformers(folder, tmp_path, transformers):
    d = _copy(folder, tmp_path)
    _edit_config(d, chat_template="{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                                  "{{ m | tojson }}{% generation %}[{{ ns.n }}]{% endgeneration %}{% endfor %}"
                                  "{{ dict(a=1) | tojson }}{{ eos_token }}")
    tok, hf = Tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d)
    messages = [{"role": "user", "content": "naïve", "reasoning": "why", "name": None}]
    ours = tok.apply_chat_template(messages)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert '"naïve"' in ours and '"reasoning_content": "why"' in ours and "name" not in ours  # aliasing, None dropped
    _edit_config(d, chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(Exception, match="underscore"):
        Tokenizer.load(d).apply_chat_template(messages)


# ---- missing and broken pieces ---------------------------------------------------------------------

def test_a_folder_without_template_loads_and_fails_only_at_chat(folder, tmp_path):
    d = _copy(folder, tmp_path)
    _edit_config(d, chat_template=None)
    tok = Tokenizer.load(d)
    assert tok.encode("hi") and tok.chat_template is None
    with pytest.raises(ValueError, match=r"no chat template in .*copy.*chat needs one"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sft_completion_continues_the_prefilled_think_block(pair):
    """R1's generation prompt already opens the think block: an SFT completion that opens it too is trained
    without that opening, as the model will continue at inference (no second <think>)."""
    from nanoseek.rl.sft_data import encode_row

    tok, _ = pair
    ask = CONVERSATIONS[0]
    for completion, learned in [("<think>\n4\n</think>\n\n4", "4\n</think>\n\n4"),
                                ("<think>4</think>4", "4</think>4"), ("4\n</think>\n\n4", "4\n</think>\n\n4")]:
        prompt, target = encode_row({"messages": ask + [{"role": "assistant", "content": completion}]}, tok)
        assert prompt == tok.encode(tok.apply_chat_template(ask)) and target == [*tok.encode(learned), tok.eos_id]


def test_a_missing_special_token_fails_only_where_it_is_needed(folder, tmp_path):
    from nanoseek.data.dataset import PackedDataset, tokenize_documents
    from nanoseek.rl.sft_data import build_examples

    d = _copy(folder, tmp_path, "no_pad")
    _edit_config(d, pad_token=None)
    tok = Tokenizer.load(d)
    assert tok.pad_id is None and tok.apply_chat_template(CONVERSATIONS[0]).startswith(BOS)
    assert tokenize_documents(["hi"], tok) == [[0, *tok.encode("hi"), 1]]
    row = {"messages": CONVERSATIONS[0] + [{"role": "assistant", "content": "4"}]}
    for make, needed_for in [(lambda: build_examples([row], tok, seq_len=64), r"SFT \(rows are padded"),
                             (lambda: PackedDataset.from_texts(["hi"], tok, seq_len=8), r"packing")]:
        with pytest.raises(ValueError, match=rf"tokenizer in .*no_pad names no pad_token .*; {needed_for}"):
            make()


@pytest.mark.parametrize("change, named", [
    (dict(bos_token="<｜nope｜>"), ["tokenizer.json", "<｜nope｜>"]),
    (dict(eos_token={"__type": "AddedToken", "lstrip": False}), ["tokenizer_config.json", "eos_token"]),
    (dict(chat_template=[{"name": "default"}]), ["tokenizer_config.json", "chat_template"]),
    (dict(chat_template=[{"name": "default", "template": "ok"}, {"name": "bad", "template": "{% if %}"}]),
     ["tokenizer_config.json", "chat_template line 1"]),
], ids=["bos-not-in-vocab", "added-token-without-content", "template-list-without-source", "named-syntax-error"])
def test_broken_folders_fail_at_load_naming_the_file(folder, tmp_path, change, named):
    d = _copy(folder, tmp_path)
    _edit_config(d, **change)
    with pytest.raises(CheckpointError) as info:
        Tokenizer.load(d)
    assert all(n in str(info.value) for n in named), str(info.value)


def test_syntax_error_in_a_template_file_names_that_file(folder, tmp_path):
    d = _copy(folder, tmp_path)
    os.makedirs(os.path.join(d, "additional_chat_templates"))
    with open(os.path.join(d, "additional_chat_templates", "tool_use.jinja"), "w") as f:
        f.write("ok\n{% for %}")
    with pytest.raises(CheckpointError, match=r"tool_use\.jinja: chat_template line 2"):
        Tokenizer.load(d)
