"""DeepSeek tool-call parsing (nanoseek/infer/tool_calls.py) on fixed outputs and streamed deltas, and the request
validation of `tools`, `tool_choice`, tool messages and `chat_template_kwargs` (nanoseek/serve/protocol.py)."""

from __future__ import annotations

import json
import random

import pytest

from nanoseek.infer.tool_calls import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolCallStream,
                                       merge_deltas, parse_tool_calls)
from nanoseek.serve.protocol import APIError, ChatCompletionRequest, ServerLimits, parse_request

ARGS = '{"city": "Paris", "note": "a ```code``` block\\n```"}'
A1 = '{"a": 1}'


def v3_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def v31_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}"


def calls(parsed) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in parsed]


CASES = [  # (id, model output, content, [(name, arguments)])
    ("v3-two-calls", f"Let me check.{CALLS_BEGIN}{v3_call('get_weather', ARGS)}\n{v3_call('add', '{}')}{CALLS_END}",
     "Let me check.", [("get_weather", ARGS), ("add", "{}")]),
    ("v31-two-calls", f"ok{CALLS_BEGIN}{v31_call('get_weather', ARGS)}{v31_call('add', A1)}{CALLS_END}",
     "ok", [("get_weather", ARGS), ("add", A1)]),
    ("v31-tool-named-function", f"{CALLS_BEGIN}{v31_call('function', '{}')}{CALLS_END}", "", [("function", "{}")]),
    ("no-calls", "just text with a <｜tool▁ lookalike", "just text with a <｜tool▁ lookalike", []),
    ("text-after-the-calls-is-dropped", f"a{CALLS_BEGIN}{v31_call('f', '{}')}{CALLS_END}trailing", "a",
     [("f", "{}")]),
    ("call-without-separator-dropped", f"{CALLS_BEGIN}{CALL_BEGIN}broken{CALL_END}{v31_call('g', '[]')}{CALLS_END}",
     "", [("g", "[]")]),
    ("cut-short-keeps-what-it-got", f"x{CALLS_BEGIN}{v3_call('f', '{}')}{CALL_BEGIN}function{SEP}g\n```json\n"
     '{"a', "x", [("f", "{}"), ("g", '{"a')]),
    ("cut-short-before-the-name", f"x{CALLS_BEGIN}{CALL_BEGIN}function{SEP}ge", "x", []),
]


@pytest.mark.parametrize("text, content, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_fixed_outputs(text, content, expected):
    got_content, got = parse_tool_calls(text)
    assert got_content == content and calls(got) == expected
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    assert len({c["id"] for c in got}) == len(got)


@pytest.mark.parametrize("text, content, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_streamed_deltas_add_up_to_the_whole_parse(text, content, expected):
    rng = random.Random(0)
    splits = [[1] * len(text)] + [[rng.randint(1, 7) for _ in range(len(text))] for _ in range(30)]
    for sizes in splits:
        stream, got_content, deltas, i = ToolCallStream(), "", [], 0
        for n in sizes:
            if i >= len(text):
                break
            c, d = stream.feed(text[i:i + n])
            got_content, deltas, i = got_content + c, deltas + d, i + n
        c, d = stream.finish()
        got_content, deltas = got_content + c, deltas + d
        assert got_content == content and calls(merge_deltas(deltas)) == expected
        firsts = [d for d in deltas if "id" in d]  # OpenAI's shape: the name once, then argument pieces
        assert [d["index"] for d in firsts] == list(range(len(expected)))
        assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                   and d["function"]["arguments"] for d in deltas if "id" not in d)


def test_stream_holds_back_only_possible_tags():
    stream = ToolCallStream()
    assert stream.feed("Hello <｜tool") == ("Hello ", [])        # could be the start of the calls
    assert stream.feed("▁x") == ("<｜tool▁x", [])                  # it was not
    content, deltas = stream.feed(f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\n{{\"a\": 1}}\n``")
    assert content == "" and deltas[0]["function"] == {"name": "f", "arguments": ""}
    assert deltas[1]["function"] == {"arguments": '{"a": 1}'}    # "\n``" held: it may close the fence
    assert stream.feed("`" + CALL_END) == ("", [])                 # it did: nothing more to send
    assert stream.feed("trailing") == ("", [])
    assert CALLS_END not in parse_tool_calls(f"{CALLS_BEGIN}{CALLS_END}")[0]


# ---- request validation ----------------------------------------------------------------------------

MSGS = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def parse(body) -> ChatCompletionRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, ChatCompletionRequest, ServerLimits())


@pytest.mark.parametrize("body, param", [
    ({"messages": MSGS, "tools": [{"type": "function", "function": {"name": "\ud800"}}]}, "tools"),
    ({"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"\udc00": 1}}}]},
     "tools"),
    ({"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f", "description": ["x"]}}]}, "tools"),
    ({"messages": MSGS, "tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
    ({"messages": MSGS, "tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
    ({"messages": MSGS, "tools": "f"}, "tools"),
    ({"messages": MSGS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": MSGS, "tool_choice": {"type": "function", "function": {"name": "\ud800"}}}, "tool_choice"),
    ({"messages": MSGS, "chat_template_kwargs": {"thinking": "\ud800"}}, "chat_template_kwargs"),
    ({"messages": MSGS, "chat_template_kwargs": {"deep": [[{"\ud83d": 1}]]}}, "chat_template_kwargs"),
    ({"messages": MSGS, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"messages": MSGS, "chat_template_kwargs": ["thinking"]}, "chat_template_kwargs"),
    (b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"t": NaN}}', "chat_template_kwargs"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f", '
     b'"parameters": {"maximum": Infinity}}}]}', "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "\ud800"}}]}]},
     "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}]},
     "messages"),
    ({"messages": [{"role": "tool", "tool_call_id": "\udfff", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "x", "reasoning_content": "\ud800"}]}, "messages"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages"),
], ids=["tool-name-surrogate", "parameters-key-surrogate", "description-list", "tool-type", "tool-name-empty",
        "tools-str", "tool-choice-str", "tool-choice-name-surrogate", "kwargs-surrogate", "kwargs-deep-surrogate",
        "kwargs-reserved", "kwargs-list", "kwargs-nan", "parameters-infinity", "call-arguments-surrogate",
        "call-arguments-object", "tool-call-id-surrogate", "reasoning-surrogate", "role-function"])
def test_new_fields_are_validated_like_the_others(body, param):
    with pytest.raises(APIError) as info:
        parse(body)
    assert (info.value.status, info.value.param) == (400, param), info.value.message
    assert len(info.value.message) < 1000


def test_tool_messages_and_tools_reach_the_template_as_sent():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    req = parse({"messages": [{"role": "developer", "content": "sys"}, *MSGS,
                              {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "r"},
                              {"role": "tool", "tool_call_id": "c1", "content": "3"}],
                 "tools": [TOOL], "tool_choice": "auto", "chat_template_kwargs": {"thinking": True, "n": [1.5]}})
    assert req.chat_messages() == [{"role": "system", "content": "sys"}, *MSGS,
                                   {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": "r"},
                                   {"role": "tool", "content": "3", "tool_call_id": "c1"}]
    assert req.tool_dicts() == [TOOL] and req.chat_template_kwargs == {"thinking": True, "n": [1.5]}
    assert parse({"messages": MSGS}).tool_dicts() is None
    nested = b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"d": ' + b"[" * 300 + \
        b'"ok"' + b"]" * 300 + b"}}"
    value = parse(nested).chat_template_kwargs["d"]  # deep but valid JSON: walked without recursion
    for _ in range(299):
        value = value[0]
    assert value == ["ok"]
