"""End-to-end tests of the OpenAI-compatible server: a real uvicorn server on a free port, driven by the
official `openai` client (and raw httpx where a client would refuse to send the request).

The model is the tiny preset trained for a few dozen steps to memorize one R1-style chat transcript and
one sentence, so greedy outputs are known text and the chat reply has a real <think> block.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from nanoseek.infer import LLM, SamplingParams
from chat_model import ANSWER, QUESTION, REASONING, save_chat_model  # noqa: E402

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from live_server import LiveServer  # noqa: E402

KEY = "test-key"
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def offline(model_dir):
    """A separate engine for reference outputs: the server's engine belongs to its own thread, and a
    second driver stepping it would race with that thread for the outputs."""
    return LLM(model_dir, max_num_seqs=4)


@pytest.fixture(scope="module")
def server(model_dir):
    s = LiveServer(model_dir, api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ---- happy paths -----------------------------------------------------------------------------------

def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").status_code == 200   # no API key needed
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_matches_offline_engine(server, client, offline):
    offline_llm = offline
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    offline = offline_llm.generate("The quick brown", SamplingParams(max_tokens=12, temperature=0))[0]
    assert r.choices[0].text == offline.outputs[0].text
    assert r.choices[0].text.startswith(" fox jumps over")  # the memorized sentence
    assert r.choices[0].finish_reason == "length"
    tok = server.llm.tokenizer
    assert r.usage.prompt_tokens == len(tok.encode("The quick brown"))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_prompt_list_n2_seed_stop(server, client):
    tok = server.llm.tokenizer
    prompts = ["zebra xylophone", tok.encode("qwerty")]
    kw = dict(model="tiny", prompt=prompts, max_tokens=6, n=2, temperature=2.0, seed=7, extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]   # seeded: reproducible
    assert a.choices[0].text != a.choices[1].text                        # n samples differ
    assert a.usage.completion_tokens == 4 * 6
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=20, temperature=0, stop=["lazy"])
    assert r.choices[0].text == " fox jumps over the " and r.choices[0].finish_reason == "stop"


def test_completion_stream_with_usage(client):
    kw = dict(model="tiny", prompt="The quick brown", max_tokens=10, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # without include_usage no usage chunk is sent
    chunks = list(client.completions.create(**kw, stream=True))
    assert chunks[-1].choices and chunks[-1].usage is None


def _reference_logprobs(model, ids):
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    return [lp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]


def test_echo_logprobs_scoring_for_lm_eval(server, client):
    """lm-eval local-completions: prompt token ids, max_tokens=0, echo, logprobs=1."""
    tok = server.llm.tokenizer
    text = "The quick brown fox"
    ids = tok.encode(text)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text == text and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == text and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]
    ref = _reference_logprobs(server.llm.model, ids)
    assert lp.token_logprobs[1:] == pytest.approx(ref, abs=1e-4)
    for tok_lp, top, tok_s in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], lp.tokens[1:]):
        assert top[tok_s] == pytest.approx(tok_lp) and max(top.values()) >= tok_lp - 1e-6
    # the memorized sentence is greedy all the way: lm-eval's is_greedy check passes
    assert all(t == pytest.approx(max(top.values())) for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    # max_tokens=1 goes through the engine's prompt_logprobs: same prompt part, plus the generated token
    r1 = client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp1 = r1.choices[0].logprobs
    assert len(lp1.token_logprobs) == len(ids) + 1 and lp1.token_logprobs[0] is None
    assert lp1.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert lp1.text_offset[-1] == len(text) and r1.choices[0].text == text + lp1.tokens[-1]
    # scoring may fill the whole context (nothing is generated)
    full = (ids * 100)[:server.engine.max_model_len]
    rf = client.completions.create(model="tiny", prompt=full, max_tokens=0, echo=True, logprobs=1)
    assert len(rf.choices[0].logprobs.token_logprobs) == server.engine.max_model_len


def test_chat_reasoning_split(server, client, offline):
    offline_llm = offline
    msgs = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0)
    m = r.choices[0].message
    assert m.role == "assistant"
    assert m.reasoning_content == REASONING and m.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    offline = offline_llm.chat(msgs, SamplingParams(max_tokens=40, temperature=0))[0].outputs[0]
    assert (offline.reasoning_content, offline.content) == (REASONING, ANSWER)
    assert r.usage.completion_tokens == len(offline.token_ids)


def test_chat_stream_reasoning_deltas_and_usage(client):
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == REASONING and content == ANSWER
    assert len([d for d in deltas if getattr(d, "reasoning_content", None)]) >= 2   # streamed, not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_chat_n2_and_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}], n=2,
                                       max_completion_tokens=5, temperature=1.0, seed=3, logprobs=True,
                                       top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.content) == 5 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert r.usage.completion_tokens == 10


def test_concurrent_requests_share_the_engine(server):
    """More requests than slots at once: all complete, queued ones wait for a free slot."""
    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as ac:
            return await asyncio.gather(*[ac.completions.create(model="tiny", prompt="The quick brown", max_tokens=8,
                                                                temperature=0) for _ in range(7)])
    outs = asyncio.run(run())
    assert len({o.choices[0].text for o in outs}) == 1 and outs[0].choices[0].text.startswith(" fox")


# ---- errors ----------------------------------------------------------------------------------------

BAD_REQUESTS = [  # (route, raw body, status, param)
    ("completions", "{not json", 400, None),
    ("completions", json.dumps({"prompt": 5}), 400, "prompt"),
    ("completions", json.dumps({"prompt": "a", "temperature": "hot"}), 400, "temperature"),
    ("completions", json.dumps({"prompt": "a", "max_tokens": -1}), 400, "max_tokens"),
    ("completions", json.dumps({"prompt": "a", "n": 0}), 400, "n"),
    ("completions", json.dumps({"prompt": "a", "temperature": -0.5}), 400, "temperature"),
    ("completions", json.dumps({"prompt": "a", "top_p": 0}), 400, "top_p"),
    ("completions", json.dumps({"prompt": "a", "n": 50}), 400, "n"),
    ("completions", json.dumps({"prompt": "a", "model": "gpt-4"}), 404, "model"),
    ("completions", json.dumps({"prompt": "hello " * 300}), 400, "prompt"),
    ("completions", json.dumps({"prompt": "hi", "max_tokens": 300}), 400, "prompt"),
    ("completions", json.dumps({"prompt": [1, 2, 100000]}), 400, "prompt"),
    ("completions", json.dumps({"prompt": []}), 400, "prompt"),
    ("completions", json.dumps([1, 2]), 400, None),
    ("chat/completions", json.dumps({"messages": []}), 400, "messages"),
    ("chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}), 400, "messages"),
    ("chat/completions", json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404, "model"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), 400,
     "max_tokens"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "x " * 300}]}), 400, "messages"),
    ("chat/completions", json.dumps({"messages": "hi"}), 400, "messages"),
]


@pytest.mark.parametrize("route,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(http, route, body, status, param):
    r = http.post(f"/v1/{route}", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert http.get("/health").status_code == 200


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hello " * 300, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    # a streamed request that is invalid fails before the stream starts
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", n=0, stream=True)


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 2, "user": "u", "logit_bias": {},
                                           "suffix": None, "best_of": 1, "something_new": {"a": [1]}})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_api_key_is_enforced(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200


# ---- disconnects and engine failures ---------------------------------------------------------------

def test_stream_disconnect_aborts_and_frees_the_slot(server):
    before = server.engine.stats.generated_tokens
    body = {"prompt": "The quick", "max_tokens": 240, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = r.iter_lines()
            got = [line for line, _ in zip((x for x in events if x.startswith("data: ")), range(3))]
            assert len(got) == 3
    assert server.wait_idle(), "the aborted stream still holds its slot"
    assert server.engine.stats.generated_tokens - before < 240, "the request ran to completion instead of aborting"


def test_plain_request_disconnect_aborts(server):
    before = server.engine.stats.generated_tokens
    body = {"prompt": "The quick", "max_tokens": 240, "ignore_eos": True, "n": 4}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=0.2))
    assert server.wait_idle()
    assert server.engine.stats.generated_tokens - before < 4 * 240


def test_engine_failure_is_a_500_and_the_server_lives_on(server, client, monkeypatch):
    real_step, calls = server.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    monkeypatch.setattr(server.engine, "step", failing_step)
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="tiny", prompt="The quick", max_tokens=20)
    monkeypatch.setattr(server.engine, "step", real_step)
    assert server.wait_idle()
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=3, temperature=0)
    assert r.choices[0].text.startswith(" fox")
