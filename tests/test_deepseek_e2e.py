"""A checkpoint folder laid out like DeepSeek's releases, end to end: `LLM.chat`, the OpenAI-compatible server
(driven by the official `openai` client), generation_config.json defaults, tool calls, V3.1's `thinking`, and
every command-line stage that takes a model folder.

The folder (tests/deepseek_folder.py) has full-width special tokens, an R1-like template that pre-fills
"<think>\\n", R1's generation_config.json, and the tiny preset fitted to a reasoning transcript and a tool-call
transcript, so greedy outputs are known text.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys

import pytest

from deepseek_folder import (ANSWER, QUESTION, REASONING, TOOL_ARGUMENTS, TOOL_CALL_TEXT, TOOL_QUESTION,
                             TOOL_REASONING, V31_TEMPLATE, WEATHER_TOOL, save_deepseek_model, with_tokenizer)
import nanoseek.checkpoint
from nanoseek import CheckpointError
from nanoseek.cli import main
from nanoseek.infer import LLM, SamplingParams
from nanoseek.infer.llm import generation_defaults

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from live_server import LiveServer  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=60)
ASK = [{"role": "user", "content": QUESTION}]
ASK_TOOL = [{"role": "user", "content": TOOL_QUESTION}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_deepseek_model(tmp_path_factory.mktemp("deepseek_r1_like"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, max_num_seqs=2)


@pytest.fixture(scope="module")
def server(model_dir):
    s = LiveServer(model_dir, api_key=None, max_num_seqs=2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


# ---- LLM.chat --------------------------------------------------------------------------------------

def test_llm_chat_splits_reasoning_of_a_prefilled_think_block(llm):
    prompt = llm.tokenizer.apply_chat_template(ASK)
    assert prompt.endswith("<｜Assistant｜><think>\n")  # the completion starts inside the think block
    out = llm.chat(ASK, GREEDY)[0].outputs[0]
    assert out.text == REASONING + "</think>" + ANSWER and "<think>" not in out.text
    assert (out.reasoning_content, out.content, out.tool_calls) == (REASONING, ANSWER, [])


def test_llm_chat_parses_tool_calls(llm):
    out = llm.chat(ASK_TOOL, GREEDY, tools=[WEATHER_TOOL])[0].outputs[0]
    assert out.text.endswith(TOOL_CALL_TEXT) and out.reasoning_content == TOOL_REASONING
    assert out.content == "\n\n"  # the text before the calls
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in out.tool_calls] == [
        ("function", "get_weather", TOOL_ARGUMENTS)]


def test_thinking_kwarg_reaches_the_v31_template(model_dir, tmp_path):
    v31 = LLM(with_tokenizer(model_dir, tmp_path / "v31", V31_TEMPLATE), max_num_seqs=1)
    prompts = {t: v31.tokenizer.apply_chat_template(ASK, thinking=t) for t in (True, False)}
    assert prompts[True].endswith("<think>") and prompts[False].endswith("</think>")
    on = v31.chat(ASK, SamplingParams(temperature=0, max_tokens=8), chat_template_kwargs={"thinking": True})
    off = v31.chat(ASK, SamplingParams(temperature=0, max_tokens=8), chat_template_kwargs={"thinking": False})
    assert on[0].prompt_token_ids[-1] == v31.tokenizer.token_to_id("<think>")
    assert off[0].prompt_token_ids[-1] == v31.tokenizer.token_to_id("</think>")
    assert on[0].outputs[0].reasoning_content is not None          # thinking: the whole reply so far is reasoning
    assert off[0].outputs[0].reasoning_content is None or "<think>" in off[0].outputs[0].text


# ---- generation_config.json ------------------------------------------------------------------------

def test_generation_config_defaults(llm, model_dir, tmp_path):
    assert llm.generation_defaults == {"temperature": 0.6, "top_p": 0.95}     # R1's, read from the folder
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.95, -1, 16)
    assert generation_defaults("vllm", model_dir) == {} and generation_defaults(None, model_dir) == {}
    assert generation_defaults("auto", model_dir, {"temperature": 0.3, "max_new_tokens": 9}) == {
        "temperature": 0.3, "top_p": 0.95, "max_tokens": 9}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 50, "temperature": 1.0, "top_p": 0.5,
                                                                  "max_new_tokens": 7, "do_sample": False}))
    # values equal to transformers' GenerationConfig defaults are not defaults (as vLLM reads the file)
    assert generation_defaults(str(tmp_path), model_dir) == {"top_p": 0.5, "max_tokens": 7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(CheckpointError, match=r"generation_config\.json: SamplingParams\.top_p"):
        generation_defaults(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'auto', 'vllm' or a folder"):
        generation_defaults(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown keys"):
        generation_defaults("vllm", overrides={"temp": 1})


# ---- the server, with the official openai client ----------------------------------------------------

def test_server_chat_reasoning_whole_and_streamed(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=60)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == (REASONING, ANSWER)
    assert r.choices[0].finish_reason == "stop" and not message.tool_calls
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=60,
                                                stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (reasoning, content) == (REASONING, ANSWER)


def test_server_tool_calls_whole_and_streamed(client):
    r = client.chat.completions.create(model="tiny", messages=ASK_TOOL, tools=[WEATHER_TOOL], temperature=0,
                                       max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content == TOOL_REASONING
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather", TOOL_ARGUMENTS)
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")
    calls, finish = {}, None
    for chunk in client.chat.completions.create(model="tiny", messages=ASK_TOOL, tools=[WEATHER_TOOL],
                                                temperature=0, max_tokens=80, stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": d.function.name, "arguments": "", "id": d.id})
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert (calls[0]["name"], calls[0]["arguments"]) == ("get_weather", TOOL_ARGUMENTS)
    # the conversation continues with the call and its result (rendered by the template)
    follow = ASK_TOOL + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    r = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER_TOOL], max_tokens=2)
    assert r.usage.prompt_tokens > 100 and r.choices[0].message.role == "assistant"


def test_server_tool_choice(client):
    r = client.chat.completions.create(model="tiny", messages=ASK_TOOL, tools=[WEATHER_TOOL], tool_choice="none",
                                       temperature=0, max_tokens=80)
    assert not r.choices[0].message.tool_calls and TOOL_CALL_TEXT in r.choices[0].message.content
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError, match="constrained decoding"):
            client.chat.completions.create(model="tiny", messages=ASK_TOOL, tools=[WEATHER_TOOL], tool_choice=choice)
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        client.chat.completions.create(model="tiny", messages=ASK, tool_choice="auto")


def test_server_applies_generation_config_defaults(server, client, monkeypatch):
    seen = []
    add = server.runner.add

    async def spy(rid, ids, params, q):
        seen.append(params)
        return await add(rid, ids, params, q)

    monkeypatch.setattr(server.runner, "add", spy)
    client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3)
    client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3, temperature=0.2, top_p=1.0)
    client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert [(p.temperature, p.top_p) for p in seen] == [(0.6, 0.95), (0.2, 1.0), (0.6, 0.95)]
    assert asyncio.iscoroutinefunction(add)


def test_server_thinking_through_chat_template_kwargs(model_dir, tmp_path):
    s = LiveServer(with_tokenizer(model_dir, tmp_path / "v31", V31_TEMPLATE), api_key=None, max_num_seqs=1)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        on, off = (c.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=6,
                                             extra_body={"chat_template_kwargs": {"thinking": t}})
                   for t in (True, False))
        assert on.choices[0].message.reasoning_content is not None
        assert off.choices[0].message.reasoning_content is None or "<think>" in off.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
            c.chat.completions.create(model="tiny", messages=ASK, extra_body={"chat_template_kwargs": {"tools": 1}})
    finally:
        s.stop()


# ---- the command line -------------------------------------------------------------------------------

def test_generate_and_chat_commands(model_dir, llm, capsys, monkeypatch):
    prompt = llm.tokenizer.apply_chat_template(ASK)
    assert main(["generate", model_dir, "--prompt", prompt, "--temperature", "0", "--max-tokens", "40",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == REASONING + "</think>" + ANSWER + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n"))
    assert main(["chat", model_dir, "--temperature", "0", "--max-tokens", "40", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == f"[reasoning] {REASONING}\n{ANSWER}\n"
    assert main(["generate", model_dir, "--prompt", "x", "--generation-config", str(model_dir) + "/nope"]) == 2
    assert "--generation-config" in capsys.readouterr().err


def test_chat_without_a_template_fails_before_the_weights_load(model_dir, tmp_path, capsys, monkeypatch):
    d = with_tokenizer(model_dir, tmp_path / "no_template", None)
    loads = []
    monkeypatch.setattr(nanoseek.checkpoint, "from_pretrained", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n"))
    assert main(["chat", d, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no chat template in" in err and "no_template" in err and "chat needs one" in err and not loads
    monkeypatch.undo()
    assert main(["generate", d, "--prompt", QUESTION, "--max-tokens", "2", "--device", "cpu"]) == 0  # no chat: fine


def test_serve_command_builds_the_app(model_dir, monkeypatch):
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    assert main(["serve", model_dir, "--port", "0", "--device", "cpu"]) == 0
    assert captured["app"].state.runner is not None and captured["port"] == 0


def test_every_model_folder_command_runs(model_dir, tmp_path, capsys):
    assert main(["info", "--model", model_dir]) == 0
    assert main(["eval", "--model", model_dir, "--tasks", "arithmetic", "--n", "1", "--k", "1",
                 "--max-new-tokens", "4", "--json"]) == 0
    assert main(["sample", "--model", model_dir, "--out", str(tmp_path / "rs.jsonl"), "--tasks", "arithmetic",
                 "--n", "1", "--k", "1", "--max-new-tokens", "4"]) == 0
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": ASK + [{"role": "assistant",
                                                    "content": "<think>\n4\n</think>\n\n4"}]}) + "\n")
    small = ["--max-steps", "1", "--seq-len", "64", "--batch-size", "1", "--no-progress"]
    assert main(["sft", "--init", model_dir, "--data", str(data), "--out", str(tmp_path / "sft"), *small]) == 0
    assert main(["distill", "--teacher", model_dir, "--data", str(data), "--out", str(tmp_path / "distill"),
                 "--student-preset", "tiny", "--kd-alpha", "0.5", *small]) == 0
    grpo = tmp_path / "grpo.json"
    grpo.write_text(json.dumps({"n_train_problems": 2, "tensorboard": False}))
    assert main(["grpo", "--init", model_dir, "--out", str(tmp_path / "grpo"), "--config", str(grpo), "--steps",
                 "1", "--group-size", "2", "--prompts-per-step", "1", "--max-new-tokens", "4", "--tasks",
                 "arithmetic", "--no-progress"]) == 0
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"max_steps": 1, "save_every": 0, "val_every": 0, "seq_len": 32, "batch_size": 2,
                                 "corpus_docs": 40}))
    assert main(["train", "--config", str(train), "--init-from", model_dir, "--out", str(tmp_path / "train"),
                 "--no-progress"]) == 0
    assert main(["train", "--config", str(train), "--tokenizer", model_dir, "--preset", "tiny", "--out",
                 str(tmp_path / "scratch"), "--no-progress"]) == 0  # a new model on the DeepSeek tokenizer
    err = capsys.readouterr().err
    assert "error" not in err, err
    for out in ("sft", "distill", "grpo"):  # each result keeps the DeepSeek tokenizer
        assert LLM(os.path.join(tmp_path, out, "model")).tokenizer.bos_token == "<｜begin▁of▁sentence｜>"
    [step] = os.listdir(tmp_path / "scratch" / "checkpoints")
    assert LLM(str(tmp_path / "scratch" / "checkpoints" / step)).tokenizer.bos_token == "<｜begin▁of▁sentence｜>"
