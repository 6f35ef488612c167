"""Hostile requests against the OpenAI-compatible server (issue 21), on a real uvicorn server.

- A fuzz corpus (lone surrogates in every string field of both routes, oversized bodies, non-finite and
  out-of-range numbers, huge stop lists, huge n/max_tokens, wrong types, invalid, deeply nested and
  empty JSON, wrong content types): each case gets its 4xx and an OpenAI error body naming the field,
  never a 5xx, and the server is healthy afterwards.
- The server keeps answering while it refuses a 10 MB request, and tokenizing runs off its event loop.
- The API key is checked before the body is read.

The model is the tiny preset untrained, with a small trained tokenizer: these tests need a server that
answers, not text that makes sense (tests/test_server.py checks outputs), so no training run is paid.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from nanoseek.infer import LLM, SamplingParams

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from live_server import LiveServer, save_tiny_model  # noqa: E402
from nanoseek.serve import create_app  # noqa: E402
from nanoseek.serve.protocol import APIError, CompletionRequest, ServerLimits, parse_request  # noqa: E402

KEY = "fuzz-key"
MB = 2**20
OVER_LIMIT = ServerLimits().max_body_bytes + MB


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_untrained"))


@pytest.fixture(scope="module")
def server(model_dir):
    s = LiveServer(model_dir, api_key=KEY)
    yield s
    s.stop()


def assert_error(r, status: int, param: str | None) -> dict:
    """An OpenAI error body with `status`, naming `param`, with a message short enough not to echo a big input."""
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert err["message"] and len(err["message"]) < 1000 and err["type"]
    return err


# ---- the corpus ------------------------------------------------------------------------------------

def j(obj) -> bytes:
    """JSON with ensure_ascii, so a lone surrogate travels as the `\\ud800` escape a reviewer would send."""
    return json.dumps(obj).encode()


MSGS = [{"role": "user", "content": "hi"}]
S = "\ud800"                # a lone high surrogate
C, CHAT = "completions", "chat/completions"


def chat(**kw) -> bytes:
    return j({"messages": MSGS, **kw})


def comp(**kw) -> bytes:
    return j({"prompt": "hi", **kw})


def chunks(body: bytes, size: int = MB):
    """A body without Content-Length (chunked transfer): the limit must be enforced while it streams."""
    for i in range(0, len(body), size):
        yield body[i:i + size]


CORPUS = [  # (id, route, body, status, param, extra headers); a callable body is built when the case runs
    # lone surrogates, in every string field of both routes
    ("surrogate-prompt", C, comp(prompt=f"{S} hi"), 400, "prompt", None),
    ("surrogate-prompt-low", C, comp(prompt="\udc00"), 400, "prompt", None),
    ("surrogate-pair-reversed", C, comp(prompt="\ude00\ud83d"), 400, "prompt", None),
    ("surrogate-prompt-list", C, comp(prompt=["ok", S]), 400, "prompt", None),
    ("surrogate-prompt-mixed-list", C, comp(prompt=[[1, 2], S]), 400, "prompt", None),
    ("surrogate-stop", C, comp(stop=S), 400, "stop", None),
    ("surrogate-stop-list", C, comp(stop=["x", S]), 400, "stop", None),
    ("surrogate-model", C, comp(model=S), 400, "model", None),
    ("surrogate-chat-content", CHAT, j({"messages": [{"role": "user", "content": f"{S} hi"}]}), 400, "messages",
     None),
    ("surrogate-chat-system", CHAT, j({"messages": [{"role": "system", "content": S}] + MSGS}), 400, "messages",
     None),
    ("surrogate-chat-part", CHAT, j({"messages": [{"role": "user", "content": [{"type": "text", "text": S}]}]}),
     400, "messages", None),
    ("surrogate-chat-stop", CHAT, chat(stop=S), 400, "stop", None),
    ("surrogate-chat-stop-list", CHAT, chat(stop=["a", S]), 400, "stop", None),
    ("surrogate-chat-model", CHAT, chat(model=S), 400, "model", None),
    ("surrogate-as-utf8-bytes", C, b'{"prompt": "\xed\xa0\x80"}', 400, None, None),
    ("invalid-utf8", C, b'{"prompt": "\xff\xfe"}', 400, None, None),
    # oversized bodies: by Content-Length, and streamed without one
    ("oversized-content-length", C, lambda: comp(prompt="a" * OVER_LIMIT), 413, None, None),
    ("oversized-chunked", CHAT, lambda: chunks(chat(stop="a" * OVER_LIMIT)), 413, None, None),
    # non-finite and out-of-range numbers (JSON's non-standard Infinity/NaN literals parse, then fail)
    ("temperature-infinity", C, b'{"prompt": "hi", "temperature": Infinity}', 400, "temperature", None),
    ("temperature-nan", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature", None),
    ("temperature-1e400", C, b'{"prompt": "hi", "temperature": 1e400}', 400, "temperature", None),
    ("temperature-over-float32", C, comp(temperature=1e300), 400, "temperature", None),
    ("top-p-minus-infinity", C, b'{"prompt": "hi", "top_p": -Infinity}', 400, "top_p", None),
    ("top-p-underflows-float32", CHAT, chat(top_p=1e-300), 400, "top_p", None),
    ("top-k-over-int64", C, comp(top_k=10**30), 400, "top_k", None),
    ("min-p-infinity", C, b'{"prompt": "hi", "min_p": Infinity}', 400, "min_p", None),
    ("repetition-penalty-tiny", C, comp(repetition_penalty=1e-300), 400, "repetition_penalty", None),
    ("repetition-penalty-nan", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": NaN}',
     400, "repetition_penalty", None),
    ("presence-penalty-out-of-range", C, comp(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency-penalty-minus-infinity", CHAT,
     b'{"messages": [{"role": "user", "content": "x"}], "frequency_penalty": -Infinity}', 400, "frequency_penalty",
     None),
    ("seed-infinity", C, b'{"prompt": "hi", "seed": Infinity}', 400, "seed", None),
    # huge n / max_tokens / logprobs
    ("n-huge", C, comp(n=10**6), 400, "n", None),
    ("n-over-slots", CHAT, chat(n=100), 400, "n", None),
    ("n-5000-digits", C, b'{"prompt": "hi", "n": ' + b"9" * 5000 + b"}", 400, None, None),
    ("max-tokens-huge", C, comp(max_tokens=10**30), 400, "prompt", None),
    ("max-tokens-huge-chat", CHAT, chat(max_tokens=10**30), 400, "messages", None),
    ("max-tokens-infinity", C, b'{"prompt": "hi", "max_tokens": Infinity}', 400, "max_tokens", None),
    ("max-completion-tokens-negative", CHAT, chat(max_completion_tokens=-5), 400, "max_completion_tokens", None),
    ("logprobs-huge", C, comp(logprobs=10**9), 400, "logprobs", None),
    ("top-logprobs-huge", CHAT, chat(logprobs=True, top_logprobs=10**9), 400, "top_logprobs", None),
    # huge stop lists: refused before they reach the engine thread
    ("stop-100k", C, comp(stop=["x"] * 100_000), 400, "stop", None),
    ("stop-100k-chat", CHAT, chat(stop=[f"s{i}" for i in range(100_000)]), 400, "stop", None),
    ("stop-5", C, comp(stop=list("abcde")), 400, "stop", None),
    ("stop-too-long", CHAT, chat(stop="x" * 10_000), 400, "stop", None),
    ("stop-token-ids-100k", C, comp(stop_token_ids=list(range(100_000))), 400, "stop_token_ids", None),
    ("prompt-100k-ids", C, comp(prompt=[5] * 100_000), 400, "prompt", None),
    ("messages-100k", CHAT, j({"messages": MSGS * 100_000}), 400, "messages", None),
    # wrong types
    ("prompt-int", C, comp(prompt=5), 400, "prompt", None),
    ("prompt-bool", C, comp(prompt=True), 400, "prompt", None),
    ("prompt-object", C, comp(prompt={"a": 1}), 400, "prompt", None),
    ("prompt-int-and-str", C, comp(prompt=[1, "a"]), 400, "prompt", None),
    ("prompt-empty-in-list", C, comp(prompt=[[1], []]), 400, "prompt", None),
    ("prompt-missing", C, j({"max_tokens": 2}), 400, "prompt", None),
    ("messages-str", CHAT, j({"messages": "hi"}), 400, "messages", None),
    ("messages-item-int", CHAT, j({"messages": [5]}), 400, "messages", None),
    ("message-content-int", CHAT, j({"messages": [{"role": "user", "content": 5}]}), 400, "messages", None),
    ("message-role-missing", CHAT, j({"messages": [{"content": "x"}]}), 400, "messages", None),
    ("stop-int", C, comp(stop=5), 400, "stop", None),
    ("stop-list-of-ints", CHAT, chat(stop=[1, 2]), 400, "stop", None),
    ("stream-list", C, comp(stream=[1]), 400, "stream", None),
    ("stream-options-int", CHAT, chat(stream=True, stream_options=5), 400, "stream_options", None),
    ("model-int", C, comp(model=5), 400, "model", None),
    ("temperature-list", CHAT, chat(temperature=[]), 400, "temperature", None),
    ("stop-token-ids-negative", C, comp(stop_token_ids=[-1]), 400, "stop_token_ids", None),
    # invalid JSON
    ("json-garbage", C, b"{not json", 400, None, None),
    ("json-truncated", CHAT, b'{"messages": [{"role": "user"', 400, None, None),
    ("json-trailing", C, b'{"prompt": "hi"} x', 400, None, None),
    ("json-single-quotes", C, b"{'prompt': 'hi'}", 400, None, None),
    # deeply nested JSON
    ("nested-100k", C, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, None),
    ("nested-100k-ignored-field", CHAT, b'{"x": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}", 400, None,
     None),
    ("nested-500-prompt", C, b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}", 400, "prompt", None),
    # empty bodies and non-object JSON
    ("empty", C, b"", 400, None, None),
    ("whitespace", CHAT, b" \n\t ", 400, None, None),
    ("empty-object", C, b"{}", 400, "prompt", None),
    ("empty-object-chat", CHAT, b"{}", 400, "messages", None),
    ("null", C, b"null", 400, None, None),
    ("array", CHAT, b"[]", 400, None, None),
    ("string", C, b'"hi"', 400, None, None),
    # wrong content types
    ("text-plain", C, comp(), 415, None, {"Content-Type": "text/plain"}),
    ("form-urlencoded", CHAT, chat(), 415, None, {"Content-Type": "application/x-www-form-urlencoded"}),
    ("multipart", C, comp(), 415, None, {"Content-Type": "multipart/form-data; boundary=x"}),
    ("xml", CHAT, chat(), 415, None, {"Content-Type": "application/xml"}),
]


@pytest.mark.parametrize("route,body,status,param,headers",
                         [pytest.param(*case[1:], id=case[0]) for case in CORPUS])
def test_fuzz_corpus_gets_4xx_naming_the_field(server, http, route, body, status, param, headers):
    r = http.post(f"/v1/{route}", content=body() if callable(body) else body,
                  headers=headers or {"Content-Type": "application/json"})
    assert_error(r, status, param)
    assert http.get("/health").status_code == 200


def test_server_is_healthy_after_the_corpus(server, http):
    """Runs after the corpus (file order): normal requests still work, nothing is left in the engine."""
    r = http.post("/v1/completions", json={"prompt": "The quick brown", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert server.runner.num_active == 0


ACCEPTED = [  # odd but valid requests: 200, not a 4xx
    ("surrogate-pair-emoji", C, comp(prompt="\ud83d\ude00 hi", max_tokens=2), None),
    ("surrogate-in-ignored-field", C, comp(user=S, max_tokens=2), None),
    ("nested-500-ignored-field", CHAT, b'{"x": ' + b"[" * 500 + b"]" * 500 +
     b', "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}', None),
    ("charset-in-content-type", C, comp(max_tokens=2), {"Content-Type": "application/json; charset=utf-8"}),
    ("no-content-type", C, comp(max_tokens=2), {}),
    ("stop-at-the-limits", C, comp(stop=["x" * 240] * 4, stop_token_ids=list(range(128)), max_tokens=2), None),
    ("tiny-temperature-greedy", CHAT, chat(temperature=1e-300, max_tokens=2), None),
    ("small-temperature-raised", C, comp(temperature=1e-3, max_tokens=2), None),
    ("seed-huge", C, comp(seed=10**30, max_tokens=2, temperature=1.0), None),
]


@pytest.mark.parametrize("route,body,headers", [pytest.param(*case[1:], id=case[0]) for case in ACCEPTED])
def test_odd_but_valid_requests_are_served(server, route, body, headers):
    hdrs = {"Authorization": f"Bearer {KEY}", **({"Content-Type": "application/json"} if headers is None else headers)}
    r = httpx.post(f"{server.url}/v1/{route}", content=body, headers=hdrs, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_wrong_method_and_route_get_openai_errors(http):
    assert_error(http.get("/v1/completions"), 405, None)
    assert_error(http.post("/v1/nothing", json={}), 404, None)


# ---- refusing a huge request stalls no one ----------------------------------------------------------

def _poll_health_while(server, send) -> tuple[httpx.Response, list[float]]:
    """Run send() in a thread and poll /health until it returns: (its response, the /health latencies)."""
    out: dict = {}
    sender = threading.Thread(target=lambda: out.setdefault("r", send()))
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as poll:
        sender.start()
        while sender.is_alive() or not latencies:
            t0 = time.perf_counter()
            assert poll.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    sender.join()
    return out["r"], latencies


BIG = [  # (id, route, body, status, code): about 10 MB each, under the 32 MiB limit, plus one over it
    ("prompt-text", C, lambda: comp(prompt="hello " * (10 * MB // 6)), 400, "context_length_exceeded"),
    ("prompt-token-ids", C, lambda: comp(prompt=[7] * (10 * MB // 3)), 400, "context_length_exceeded"),
    ("chat-message", CHAT, lambda: j({"messages": [{"role": "user", "content": "hello " * (10 * MB // 6)}]}), 400,
     "context_length_exceeded"),
    ("stop-list", C, lambda: comp(stop=["stop"] * (10 * MB // 8)), 400, None),
    ("over-limit-chunked", C, lambda: chunks(comp(prompt="a" * OVER_LIMIT)), 413, "request_too_large"),
]


@pytest.mark.parametrize("route,make,status,code", [pytest.param(*case[1:], id=case[0]) for case in BIG])
def test_health_answers_within_1s_while_a_10mb_request_is_refused(server, route, make, status, code):
    body = make()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r, latencies = _poll_health_while(server, lambda: httpx.post(f"{server.url}/v1/{route}", content=body,
                                                                 headers=headers, timeout=60))
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text[:300]
    assert max(latencies) < 1.0, f"/health took {max(latencies):.2f}s while the big request was refused"


def test_tokenizing_runs_off_the_event_loop(server, http, monkeypatch):
    """A slow tokenization (simulated: 1.5 s) of a prompt that passes the length pre-check runs on a worker
    thread; /health answers meanwhile."""
    tok = server.llm.tokenizer
    real, threads = tok.encode_batch, []

    def slow_encode_batch(texts):
        threads.append(threading.get_ident())
        time.sleep(1.5)
        return real(texts)

    monkeypatch.setattr(tok, "encode_batch", slow_encode_batch)
    prompt = "hello " * 500   # 3000 characters: over the inline size, under max_model_len * max_token_bytes
    for route, body in [(C, comp(prompt=prompt)), (CHAT, j({"messages": [{"role": "user", "content": prompt}]}))]:
        r, latencies = _poll_health_while(server, lambda: http.post(f"/v1/{route}", content=body))
        err = assert_error(r, 400, "prompt" if route == C else "messages")  # refused on its exact token count
        assert err["code"] == "context_length_exceeded" and "at least" not in err["message"]
        assert max(latencies) < 1.0 and len(latencies) >= 3
    assert len(threads) == 2 and server.thread.ident not in threads


def test_huge_stop_list_never_reaches_the_engine(server, http):
    before = server.llm.llm_engine.stats.generated_tokens
    t0 = time.perf_counter()
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 200, "stop": ["zz"] * 100_000})
    assert_error(r, 400, "stop")
    assert time.perf_counter() - t0 < 3.0
    assert server.llm.llm_engine.stats.generated_tokens == before


# ---- the API key comes before the body ---------------------------------------------------------------

@pytest.mark.parametrize("key,body,headers", [
    pytest.param("wrong", b"{not json", {"Content-Type": "application/json"}, id="invalid-json"),
    pytest.param(None, b"", {}, id="no-key-empty-body"),
    pytest.param("wrong", comp(), {"Content-Type": "text/plain"}, id="wrong-content-type"),
    pytest.param("wrong", lambda: comp(prompt="a" * OVER_LIMIT), {}, id="oversized"),
    pytest.param("wrong", lambda: chunks(comp(prompt="a" * OVER_LIMIT)), {}, id="oversized-chunked"),
])
def test_wrong_key_gets_401_before_the_body_is_read(server, key, body, headers):
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    for route in (C, CHAT):
        r = httpx.post(f"{server.url}/v1/{route}", content=body() if callable(body) else body,
                       headers={**auth, **headers}, timeout=60)
        assert assert_error(r, 401, None)["code"] == "invalid_api_key"


@pytest.mark.parametrize("key,length,status", [("wrong", 1000, 401), (KEY, OVER_LIMIT, 413)])
def test_refusals_come_before_the_body_is_read(server, key, length, status):
    """Headers announcing a body that never comes: a server that read the body first would hang."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode())
        reply = sock.recv(4096).decode()
    assert reply.startswith(f"HTTP/1.1 {status} "), reply[:200]


def test_right_key_with_invalid_json_gets_400(http):
    err = assert_error(http.post("/v1/completions", content=b"{not json",
                                 headers={"Content-Type": "application/json"}), 400, None)
    assert "not valid JSON" in err["message"]


# ---- policies: SamplingParams, ServerLimits, create_app and `nanoseek serve` flags ----------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=1e39), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=1e-31), "top_p"), (dict(top_k=2**63), "top_k"),
    (dict(repetition_penalty=1e-40), "repetition_penalty"), (dict(repetition_penalty=10**400), "repetition_penalty"),
    (dict(min_p=float("-inf")), "min_p"), (dict(presence_penalty=float("inf")), "presence_penalty"),
])
def test_sampling_params_refuse_numbers_the_float32_sampler_cannot_hold(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_treat_tiny_temperatures_like_vllm():
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=9e-6).temperature == 0
    assert SamplingParams(temperature=1e-5).temperature == SamplingParams(temperature=0.005).temperature == 0.01
    assert SamplingParams(temperature=0).temperature == 0 and SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.5).temperature == 0.5 and SamplingParams(top_k=2**63 - 1).top_k_enabled


def test_server_limits_check_and_validation():
    strict, loose = ServerLimits(max_stop_strings=1), ServerLimits(max_stop_strings=8, max_stop_length=1000)
    body = json.dumps({"prompt": "a", "stop": ["x" * 500] * 5}).encode()
    assert parse_request(body, CompletionRequest, loose).stop == ["x" * 500] * 5
    with pytest.raises(APIError, match="at most 1 stop strings") as e:
        parse_request(body, CompletionRequest, strict)
    assert (e.value.status, e.value.param) == (400, "stop")
    with pytest.raises(ValueError, match=r"ServerLimits\.max_stop_length must be an int >= 1"):
        ServerLimits(max_stop_length=0)


def test_create_app_and_serve_flags_set_the_limits(model_dir, monkeypatch):
    from nanoseek.cli import build_parser
    from nanoseek.serve import commands

    llm = LLM(model_dir, max_num_seqs=1)
    with pytest.raises(ValueError, match=r"ServerLimits\.max_body_bytes"):
        create_app(llm, max_body_bytes=0)
    assert create_app(llm).state.limits == ServerLimits()
    captured = {}
    monkeypatch.setattr(commands, "load_llm", lambda args, default_seqs: llm)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app))
    args = build_parser().parse_args(["serve", model_dir, "--max-body-bytes", "1000", "--max-stop-strings", "8",
                                      "--max-stop-length", "16", "--max-stop-token-ids", "2"])
    args.func(args)
    assert captured["app"].state.limits == ServerLimits(1000, 8, 16, 2)
    args = build_parser().parse_args(["serve", model_dir])
    args.func(args)
    assert captured["app"].state.limits == ServerLimits()
