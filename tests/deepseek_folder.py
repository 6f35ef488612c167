"""A test helper: model folders laid out like DeepSeek's releases, made here (nothing is downloaded).

- tokenizer.json: a small byte-level BPE with DeepSeek's full-width special tokens (`<｜begin▁of▁sentence｜>` 0,
  `<｜end▁of▁sentence｜>` 1, ...), `<think>`/`</think>`, the role and tool-call tokens as added, non-special
  tokens (as in the releases), and a post-processor that puts BOS in front (`encode(text)` in transformers).
- tokenizer_config.json: bos/eos/pad as AddedToken objects, `add_bos_token` and the `LlamaTokenizerFast` class
  of the releases, and an R1-like chat template (written for these tests; DeepSeek-R1's layout): system text
  bare after BOS, earlier turns' reasoning dropped, V3/R1 tool calls, tools listed in the system text, and the
  generation prompt `<｜Assistant｜><think>\\n`. V31_TEMPLATE is V3.1's layout, switched by `thinking`.
- generation_config.json: DeepSeek-R1's sampling defaults (temperature 0.6, top-p 0.95).
- weights: the tiny preset fitted to a reasoning transcript and a tool-call transcript until greedy decoding
  reproduces both, so greedy outputs are known text.
"""

from __future__ import annotations

import json
import os

import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

import nanoseek
from nanoseek.data import default_corpus

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
ADDED = [THINK, END_THINK, USER, ASSISTANT, CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, OUTPUTS_BEGIN,
         OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END]

R1_TEMPLATE = (
    "{%- set ns = namespace(system='', in_outputs=false) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{%- if tools is not none -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + '## Tools (call one as ' + '" + CALLS_BEGIN
    + CALL_BEGIN + "function" + SEP + "NAME\\n```json\\nARGUMENTS\\n```" + CALL_END + CALLS_END + ")' -%}"
    "{%- for t in tools -%}{%- set ns.system = ns.system + '\\n' + (t | tojson) -%}{%- endfor -%}"
    "{%- endif -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] != 'tool' and ns.in_outputs -%}{{- '" + OUTPUTS_END + "' -}}{%- set ns.in_outputs = false -%}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{- '" + USER + "' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] if m['content'] is defined else '' -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '" + ASSISTANT + "' + content -}}"
    "{%- if m['tool_calls'] is defined -%}{{- '" + CALLS_BEGIN + "' -}}"
    "{%- for c in m['tool_calls'] -%}"
    "{{- '" + CALL_BEGIN + "' + c['type'] + '" + SEP + "' + c['function']['name'] + '\\n```json\\n'"
    " + c['function']['arguments'] + '\\n```" + CALL_END + "' -}}"
    "{%- endfor -%}{{- '" + CALLS_END + "' -}}{%- endif -%}"
    "{{- eos_token -}}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if not ns.in_outputs -%}{{- '" + OUTPUTS_BEGIN + "' -}}{%- set ns.in_outputs = true -%}{%- endif -%}"
    "{{- '" + OUTPUT_BEGIN + "' + m['content'] + '" + OUTPUT_END + "' -}}"
    "{%- elif m['role'] != 'system' -%}{{- raise_exception('unknown role ' + m['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.in_outputs -%}{{- '" + OUTPUTS_END + "' -}}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "<think>\\n' -}}{%- endif -%}")

V31_TEMPLATE = (
    "{%- set thinking = thinking if thinking is defined else false -%}"
    "{{- bos_token -}}"
    "{%- for m in messages if m['role'] == 'system' -%}{{- m['content'] -}}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '" + USER + "' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] if m['content'] is defined else '' -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>', 1)[1] -%}{%- endif -%}"
    "{{- '" + ASSISTANT + "</think>' + content -}}"
    "{%- for c in m['tool_calls'] if m['tool_calls'] is defined -%}"
    "{{- ('" + CALLS_BEGIN + "' if loop.first else '') + '" + CALL_BEGIN + "' + c['function']['name'] + '" + SEP
    + "' + c['function']['arguments'] + '" + CALL_END + "' + ('" + CALLS_END + "' if loop.last else '') -}}"
    "{%- endfor -%}"
    "{{- eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "' + ('<think>' if thinking else '</think>') -}}"
    "{%- endif -%}")

GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION, REASONING, ANSWER = "What is 2+2?", "add two and two\n", "\n\n4"
TOOL_QUESTION, TOOL_REASONING = "Weather in Paris?", "look it up\n"
TOOL_ARGUMENTS = '{"city": "Paris"}'
TOOL_CALL_TEXT = (CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_weather\n```json\n" + TOOL_ARGUMENTS
                  + "\n```" + CALL_END + CALLS_END)


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_tokenizer(d, template: str | None = R1_TEMPLATE, vocab_size: int = 600) -> None:
    """tokenizer.json and tokenizer_config.json of a DeepSeek-style tokenizer into folder `d`."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([  # digit runs of at most 3, then GPT-2-style byte level
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(default_corpus(200), trainer)
    backend.add_tokens([AddedToken(t, normalized=True, special=False) for t in ADDED])
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                                           special_tokens=[(BOS, 0)])
    os.makedirs(d, exist_ok=True)
    backend.save(os.path.join(d, "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": _added_token(BOS),
              "eos_token": _added_token(EOS), "pad_token": _added_token(EOS), "unk_token": None,
              "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
              "tokenizer_class": "LlamaTokenizerFast"}
    if template is not None:
        config["chat_template"] = template
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)


def transcripts(tok) -> list[tuple[str, str]]:
    """The two conversations the tiny model is fitted to, as (prompt, completion) text."""
    plain = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
    tools = tok.apply_chat_template([{"role": "user", "content": TOOL_QUESTION}], tools=[WEATHER_TOOL])
    return [(plain, REASONING + END_THINK + ANSWER + EOS),
            (tools, TOOL_REASONING + END_THINK + "\n\n" + TOOL_CALL_TEXT + EOS)]


def save_deepseek_model(d, max_steps: int = 400, margin: float = 1.0) -> str:
    """A DeepSeek-style folder: tokenizer, generation_config.json and the tiny model fitted to `transcripts`.

    Training runs until every completion token is the argmax of its teacher-forced logits by at least `margin`
    (so greedy decoding, with the cache's absorbed attention and its rounding, reproduces the completions),
    checked every few steps; a model that does not get there in max_steps raises instead of giving the tests a
    model that does not know its text. The tool-call prompt is long (~285 tokens, most of them the
    tool schema), which is why a fixed small step count was not enough.
    """
    from nanoseek.data import Tokenizer

    write_tokenizer(d)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f)
    tok = Tokenizer.load(d)
    torch.manual_seed(0)
    cfg = nanoseek.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512,
                                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = nanoseek.build_model(cfg, seed=0)
    pairs = transcripts(tok)
    docs = [torch.tensor(tok.encode(p + c)) for p, c in pairs]
    starts = [len(tok.encode(p)) for p, _ in pairs]  # first completion position (the prompt's ids are a prefix)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)  # 1e-2 spikes on these two long sequences
    for step in range(1, max_steps + 1):
        model.train()
        loss = sum(torch.nn.functional.cross_entropy(model(x[None, :-1])[0], x[1:]) for x in docs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 and _memorized(model, docs, starts, margin):
            break
    else:
        raise RuntimeError(f"the tiny model did not memorize its transcripts in {max_steps} steps")
    nanoseek.save_pretrained(model.eval(), d)
    return str(d)


@torch.no_grad()
def _memorized(model, docs: list, starts: list[int], margin: float) -> bool:
    """Whether every completion token beats every other token by `margin` in the teacher-forced logits."""
    model.eval()
    for x, start in zip(docs, starts):
        logits = model(x[None, :-1])[0][start - 1:]
        target = x[start:, None]
        best_other = logits.scatter(-1, target, float("-inf")).amax(-1)
        if (logits.gather(-1, target)[:, 0] - best_other).min() < margin:
            return False
    return True


def with_tokenizer(model_dir, d, template: str | None) -> str:
    """Folder `d`: model_dir's weights and config (linked) with a tokenizer using `template` (None: none)."""
    os.makedirs(d, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(model_dir, name), os.path.join(d, name))
    write_tokenizer(d, template)
    return str(d)
