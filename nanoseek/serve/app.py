"""The OpenAI-compatible HTTP server: FastAPI routes over an EngineRunner.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with SSE
streaming and `stream_options.include_usage`).

Key choices:
- Bad input never reaches the engine thread unchecked: the request model, the model name, token ids,
  the context length and SamplingParams are checked in the handler and answered with a 4xx OpenAI
  error body; the engine's own "cannot fit" ValueError is a 400 too. Only a broken engine gives a 500.
- A hostile request costs little and stalls no one: the API key is checked before the body is read,
  the body is bounded (ServerLimits) and parsed by protocol.py, stop lists are bounded, and a text
  that cannot fit the context whatever its tokens (more characters than max_model_len times the
  most bytes a token spells) is refused before tokenizing. Big JSON, chat-template rendering and
  tokenizing run on a worker thread, tokenizing through `encode_batch`, which releases the GIL
  (`encode` holds it: a 1 MB prompt froze every other request for seconds).
- A client that goes away aborts its requests (their cache slots are freed at once): a stream notices
  through Starlette's disconnect listener cancelling the generator; a plain request races its result
  against `http.disconnect`.
- /v1/completions with `echo` and `logprobs` returns the legacy `tokens / token_logprobs /
  top_logprobs / text_offset` block over prompt + completion, the first prompt token's logprob null,
  as lm-eval's `local-completions` expects; `max_tokens=0` scores the prompt without generating.
- Chat replies of R1 models are split into `reasoning_content` (inside <think>...</think>) and
  `content`, incrementally while streaming; a template that opens the think block itself (R1's
  "<think>\n" generation prompt) is accounted for. With `tools` (and `tool_choice` "auto", the default),
  DeepSeek tool calls are parsed out of the content into `tool_calls` (nanoseek/infer/tool_calls.py), streamed as
  OpenAI's tool-call deltas, with finish_reason "tool_calls"; tool-call tokens are then kept in the decoded
  text (skip_special_tokens off). `tool_choice` "required" or a named function would need constrained
  decoding and is refused (400).
- Sampling fields a request leaves unset take the model's generation_config.json defaults
  (`LLM.generation_defaults`, vLLM's `--generation-config auto`); a chat request without max_tokens gets its
  max_new_tokens, capped by the context left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from functools import partial
from typing import AsyncIterator

import torch

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.params import SamplingParams
from ..infer.sampler import logprobs_of
from ..infer.reasoning import ReasoningStream, prompt_opens_think, split_reasoning
from ..infer.tool_calls import ToolCallStream, parse_tool_calls
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, ServerLimits, chat_logprobs,
                       describe_validation_error, error_body, join_legacy, legacy_logprobs, parse_request, read_body,
                       sse)
from .runner import EngineDied, EngineRunner

_LIMITS = ServerLimits()
_INLINE_SIZE = 2048  # bytes of request body whose parsing and tokenizing run inline; bigger go to a thread


def create_app(llm, served_model_name: str = "nanoseek", api_key: str | None = None,
               max_body_bytes: int = _LIMITS.max_body_bytes, max_stop_strings: int = _LIMITS.max_stop_strings,
               max_stop_length: int = _LIMITS.max_stop_length,
               max_stop_token_ids: int = _LIMITS.max_stop_token_ids) -> FastAPI:
    """Build the FastAPI app serving `llm` (a nanoseek.LLM); its engine thread runs while the app does.

    Args:
        llm: the nanoseek.LLM whose engine, tokenizer and max_model_len are served.
        served_model_name: the model id clients must name (or omit) in requests.
        api_key: when set, /v1/* routes need `Authorization: Bearer <api_key>`.
        max_body_bytes, max_stop_strings, max_stop_length, max_stop_token_ids: the ServerLimits a request is
            held to (see nanoseek/serve/protocol.py for the defaults and where they come from).
    """
    limits = ServerLimits(max_body_bytes, max_stop_strings, max_stop_length, max_stop_token_ids)
    runner = EngineRunner(llm.llm_engine)
    server = _Server(llm, runner, served_model_name, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.runner, app.state.limits = runner, limits

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "authentication_error", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(*describe_validation_error(e.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "internal_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    # The body is not a declared parameter: FastAPI would read and parse it before check_key runs.
    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(raw: Request):
        req, size = await server.read(raw, CompletionRequest)
        return await server.completions(req, raw, size)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(raw: Request):
        req, size = await server.read(raw, ChatCompletionRequest)
        return await server.chat(req, raw, size)

    return app


class _Server:
    """The request handling behind the routes (kept out of create_app so each piece reads on its own)."""

    def __init__(self, llm, runner: EngineRunner, name: str, limits: ServerLimits):
        self.llm, self.runner, self.name, self.limits = llm, runner, name, limits
        self.tok = llm.tokenizer
        self.max_model_len: int = llm.llm_engine.max_model_len
        self.vocab_size: int = llm.llm_engine.cfg.vocab_size
        self.max_num_seqs: int = llm.llm_engine.max_num_seqs
        # Every token's text is at most this many UTF-8 bytes (a partial byte decodes to the 3-byte U+FFFD,
        # which only overestimates), and a character is at least one byte: a text of c characters has
        # at least c / max_token_bytes tokens.
        self.max_token_bytes = max(len(self.tok.decode([i]).encode()) for i in range(self.tok.vocab_size)) or 1
        self.created = int(time.time())
        self.defaults = dict(getattr(llm, "generation_defaults", None) or {})  # generation_config.json

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                "max_model_len": self.max_model_len}

    # ---- reading and checks ---------------------------------------------------------------------------

    async def read(self, raw: Request, model: type) -> tuple:
        """(the request body held to the limits and validated as `model`, the body's size in bytes); any
        failure is a 4xx APIError. The size measures the CPU work the request will take (see _off_loop)."""
        body = await read_body(raw, self.limits.max_body_bytes)
        return await _off_loop(partial(parse_request, body, model, self.limits), len(body)), len(body)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            shown = model if len(model) <= 100 else model[:100] + "..."
            raise APIError(404, f"The model `{shown}` does not exist; this server serves `{self.name}`.",
                           "not_found_error", "model", "model_not_found")

    def _check_n(self, n: int) -> None:
        if n > self.max_num_seqs:
            raise APIError(400, f"n={n} exceeds the {self.max_num_seqs} sequences this server decodes at once.",
                           param="n")

    def _check_fits(self, prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        need = prompt_tokens + (1 if max_tokens is None else max_tokens)
        if need > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"you requested {need} tokens ({prompt_tokens} in the prompt, {need - prompt_tokens} for "
                           f"the completion). Please reduce the prompt or max_tokens.", param=param,
                           code="context_length_exceeded")

    def _check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        if not ids:
            raise APIError(400, "The prompt is empty.", param=param)
        self._check_fits(len(ids), max_tokens, param)  # before the scan below, which is O(len(ids))
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}).", param=param)

    def _encode(self, texts: list[str], param: str) -> list[list[int]]:
        """Token ids of `texts`; a text too long to fit whatever its tokens is refused untokenized."""
        for text in texts:
            at_least = -(-len(text) // self.max_token_bytes)
            if at_least > self.max_model_len:
                raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                               f"your prompt of {len(text)} characters has at least {at_least} tokens. Please "
                               f"reduce the prompt.", param=param, code="context_length_exceeded")
        if hasattr(self.tok, "encode_batch"):  # releases the GIL while the Rust backend works
            return self.tok.encode_batch(texts)
        return [self.tok.encode(t) for t in texts]

    def _params(self, **kwargs) -> SamplingParams:
        """SamplingParams of a request's fields, the generation-config defaults filling the unset ones."""
        kwargs = {**{k: v for k, v in self.defaults.items() if k != "max_tokens"}, **kwargs}
        try:
            return SamplingParams(**kwargs)
        except (TypeError, ValueError) as e:
            field = str(e).split("SamplingParams.", 1)[-1].split(" ", 1)[0] if "SamplingParams." in str(e) else None
            raise APIError(400, str(e), param=field) from None

    # ---- running requests -----------------------------------------------------------------------------

    async def _submit(self, prompts: list[list[int]], params: SamplingParams, prefix: str
                      ) -> tuple[list[str], asyncio.Queue]:
        """Add one engine request per prompt, all feeding one queue; aborts the added ones on failure."""
        rids: list[str] = []
        q: asyncio.Queue = asyncio.Queue()
        try:
            for ids in prompts:
                rid = f"{prefix}-{uuid.uuid4().hex}"
                rids.append(rid)
                await self.runner.add(rid, ids, params, q)
        except BaseException as e:
            for rid in rids:
                self.runner.abort(rid)
            if isinstance(e, ValueError):
                raise APIError(400, str(e)) from None
            if isinstance(e, EngineDied):
                raise APIError(503, str(e), "server_error") from None
            raise
        return rids, q

    async def _events(self, rids: list[str], q: asyncio.Queue) -> AsyncIterator:
        """The RequestOutputs of `rids` as they come, until all are finished; aborts the rest if left early."""
        open_ = set(rids)
        try:
            while open_:
                out = await q.get()
                if isinstance(out, Exception):
                    raise out
                if out.finished:
                    open_.discard(out.request_id)
                yield out
        finally:
            for rid in open_:
                self.runner.abort(rid)

    async def _collect(self, rids: list[str], q: asyncio.Queue, raw: Request) -> dict:
        """The final RequestOutput per request id; aborts everything if the client disconnects first."""

        async def gather():
            final = {}
            async for out in self._events(rids, q):
                final[out.request_id] = out
            return final

        task = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(_disconnected(raw))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                for rid in rids:
                    self.runner.abort(rid)
        if not task.done() or task.cancelled():
            raise APIError(499, "client disconnected")
        try:
            return task.result()
        except EngineDied as e:
            raise APIError(500, str(e), "server_error") from None

    def _stream(self, chunks: AsyncIterator[dict], usage, include_usage: bool, head: dict) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield sse(chunk)
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage()})
            except EngineDied as e:
                yield sse(error_body(str(e), "server_error"))
            yield sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- /v1/completions ------------------------------------------------------------------------------

    def _completion_prompts(self, prompt, max_tokens: int | None) -> list[tuple[str, list[int]]]:
        """(text, token ids) per prompt, each checked (CPU work for a worker thread when the request is big)."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        elif not prompt:
            raise APIError(400, "The prompt is empty.", param="prompt")
        encoded = iter(self._encode([p for p in prompt if isinstance(p, str)], "prompt"))
        prompts = [(p, next(encoded)) if isinstance(p, str) else (None, list(p)) for p in prompt]
        for _, ids in prompts:
            self._check_prompt(ids, max_tokens, "prompt")
        return [(p if p is not None else self.tok.decode(ids), ids) for p, ids in prompts]

    async def completions(self, req: CompletionRequest, raw: Request, size: int):
        self._check_model(req.model)
        self._check_n(req.n)
        prompts = await _off_loop(partial(self._completion_prompts, req.prompt, req.max_tokens), size)
        texts = [text for text, _ in prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if req.max_tokens == 0:
            return await self._score(req, prompts, texts, head)
        want_lp, n = req.logprobs is not None, req.n
        params = self._params(**req.sampling_kwargs(), max_tokens=req.max_tokens, logprobs=req.logprobs,
                              prompt_logprobs=req.logprobs if req.echo and want_lp else None)
        rids, q = await self._submit([ids for _, ids in prompts], params, "cmpl")
        index = {rid: i for i, rid in enumerate(rids)}

        def echo_logprobs(out) -> dict:
            return legacy_logprobs(self.tok, out.prompt_token_ids, out.prompt_logprobs or [None], 0)

        def usage(finals: dict) -> dict:
            done = sum(len(c.token_ids) for o in finals.values() for c in o.outputs)
            p = sum(len(ids) for _, ids in prompts)
            return {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done}

        if not req.stream:
            finals = await self._collect(rids, q, raw)
            choices = []
            for rid in rids:
                out, i = finals[rid], index[rid]
                for c in out.outputs:
                    lp = None
                    if want_lp:
                        lp = legacy_logprobs(self.tok, c.token_ids, c.logprobs or [], len(texts[i]) if req.echo else 0)
                        lp = join_legacy(echo_logprobs(out), lp) if req.echo else lp
                    choices.append({"index": i * n + c.index, "text": (texts[i] if req.echo else "") + c.text,
                                    "logprobs": lp, "finish_reason": c.finish_reason})
            choices.sort(key=lambda c: c["index"])
            return {**head, "choices": choices, "usage": usage(finals)}

        finals: dict = {}

        async def chunks():
            sent_lp: dict[int, int] = {}   # choice -> tokens whose logprobs were sent
            offset: dict[int, int] = {}    # choice -> text_offset of its next token
            async for out in self._events(rids, q):
                finals[out.request_id] = out
                i = index[out.request_id]
                for c in out.outputs:
                    k = i * n + c.index
                    text, lp, first = c.delta_text, None, k not in offset
                    if first:
                        offset[k] = len(texts[i]) if req.echo else 0
                    if want_lp:
                        start = sent_lp.get(k, 0)
                        lp = legacy_logprobs(self.tok, c.token_ids[start:], (c.logprobs or [])[start:], offset[k])
                        sent_lp[k] = len(c.token_ids)
                        if lp["tokens"]:
                            offset[k] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                    if req.echo and first:
                        text = texts[i] + text
                        lp = join_legacy(echo_logprobs(out), lp) if want_lp else None
                    if text or c.finish_reason or (lp and lp["tokens"]):
                        yield {**head, "choices": [{"index": k, "text": text, "logprobs": lp,
                                                    "finish_reason": c.finish_reason}],
                               **({"usage": None} if req.include_usage else {})}

        return self._stream(chunks(), lambda: usage(finals), req.include_usage, head)

    async def _score(self, req: CompletionRequest, prompts: list, texts: list[str], head: dict):
        """max_tokens=0: nothing is generated; with echo the prompt comes back, with logprobs scored.

        Scoring is one forward per prompt on the engine thread (not an engine request), so a prompt
        may fill the whole context, as lm-eval's loglikelihood requests do.
        """
        lps = [None] * len(prompts)
        if req.echo and req.logprobs is not None:
            lps = [await self.runner.call(partial(self._prompt_logprobs, ids, req.logprobs)) for _, ids in prompts]
        choices = [{"index": i * req.n + j, "text": texts[i] if req.echo else "",
                    "logprobs": legacy_logprobs(self.tok, ids, lps[i], 0) if lps[i] is not None else None,
                    "finish_reason": "length"} for i, (_, ids) in enumerate(prompts) for j in range(req.n)]
        p = sum(len(ids) for _, ids in prompts)
        usage = {"prompt_tokens": p, "completion_tokens": 0, "total_tokens": p}
        if not req.stream:
            return {**head, "choices": choices, "usage": usage}

        async def chunks():
            for c in choices:
                yield {**head, "choices": [c], **({"usage": None} if req.include_usage else {})}

        return self._stream(chunks(), lambda: usage, req.include_usage, head)

    def _prompt_logprobs(self, ids: list[int], top_n: int) -> list:
        """vLLM-style prompt logprobs of `ids` (None for the first token) from one plain forward."""
        engine = self.llm.llm_engine
        with torch.inference_mode():
            logits = engine.model(torch.tensor([ids], device=engine.runner.device))[0, :-1]
            _, dicts = logprobs_of(logits, torch.tensor(ids[1:], device=logits.device), [top_n] * (len(ids) - 1),
                                   lambda t: self.tok.decode([t]))
        return [None] + dicts

    # ---- /v1/chat/completions -------------------------------------------------------------------------

    def _render(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The chat prompt text and its checked token ids (CPU work for a worker thread when the request is big)."""
        try:
            text = self.tok.apply_chat_template(req.chat_messages(), add_generation_prompt=req.add_generation_prompt,
                                                tools=req.tool_dicts(), **(req.chat_template_kwargs or {}))
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise APIError(400, f"cannot render the chat template: {e}", param="messages") from None
        ids = self._encode([text], "messages")[0]
        self._check_prompt(ids, req.max_new_tokens, "messages")
        return text, ids

    @staticmethod
    def _check_tools(req: ChatCompletionRequest) -> bool:
        """Whether the reply is parsed for tool calls; 400 for a tool_choice this server cannot honour."""
        choice = req.tool_choice
        if choice is not None and choice != "none" and not req.tools:
            raise APIError(400, "tool_choice needs tools: pass the tools the model may call.", param="tool_choice")
        if choice == "required" or (choice is not None and not isinstance(choice, str)):
            raise APIError(400, "tool_choice 'required' or a named function needs constrained decoding, which this "
                           "server does not have; use 'auto' (the default) or 'none'.", param="tool_choice")
        return bool(req.tools) and choice != "none"

    async def chat(self, req: ChatCompletionRequest, raw: Request, size: int):
        self._check_model(req.model)
        self._check_n(req.n)
        max_tokens = req.max_new_tokens
        if max_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1 for chat completions.", param="max_tokens")
        tools_on = self._check_tools(req)
        text, ids = await _off_loop(partial(self._render, req), size)
        if max_tokens is None and "max_tokens" in self.defaults:
            max_tokens = min(self.defaults["max_tokens"], self.max_model_len - len(ids))
        want_lp, top_n = req.logprobs, req.top_logprobs or 0
        think_opened = prompt_opens_think(text)
        kwargs = req.sampling_kwargs()
        if tools_on:  # the tool-call tokens must survive decoding even where a tokenizer marks them special
            kwargs["skip_special_tokens"] = False
        params = self._params(**kwargs, max_tokens=max_tokens, logprobs=top_n if want_lp else None)
        rids, q = await self._submit([ids], params, "chatcmpl")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name}

        def usage(final) -> dict:
            done = sum(len(c.token_ids) for c in final.outputs) if final else 0
            return {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done}

        if not req.stream:
            final = (await self._collect(rids, q, raw))[rids[0]]
            choices = []
            for c in final.outputs:
                reasoning, content = split_reasoning(c.text, think_opened)
                message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
                finish = c.finish_reason
                if tools_on:
                    content, calls = parse_tool_calls(content)
                    message["content"] = content or (None if calls else content)
                    if calls:
                        message["tool_calls"] = calls
                        finish = "tool_calls" if finish == "stop" else finish
                lp = chat_logprobs(self.tok, c.token_ids, c.logprobs, top_n) if want_lp else None
                choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish})
            return {**head, "choices": choices, "usage": usage(final)}

        head = {**head, "object": "chat.completion.chunk"}
        last: list = [None]

        async def chunks():
            extra = {"usage": None} if req.include_usage else {}
            for j in range(req.n):
                yield {**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], **extra}
            splitters = [ReasoningStream(think_opened) for _ in range(req.n)]
            tool_streams = [ToolCallStream() for _ in range(req.n)] if tools_on else None
            sent_lp = [0] * req.n
            async for out in self._events(rids, q):
                last[0] = out
                for c in out.outputs:
                    deltas = []
                    reasoning, content = splitters[c.index].feed(c.delta_text)
                    if c.finish_reason:
                        r2, c2 = splitters[c.index].finish()
                        reasoning, content = reasoning + r2, content + c2
                    calls, finish = [], c.finish_reason
                    if tool_streams is not None:
                        stream = tool_streams[c.index]
                        content, calls = stream.feed(content)
                        if finish:
                            c3, more = stream.finish()
                            content, calls = content + c3, calls + more
                            finish = "tool_calls" if finish == "stop" and stream.count else finish
                    lp = None
                    if want_lp and len(c.token_ids) > sent_lp[c.index]:
                        lp = chat_logprobs(self.tok, c.token_ids[sent_lp[c.index]:],
                                           (c.logprobs or [])[sent_lp[c.index]:], top_n)
                        sent_lp[c.index] = len(c.token_ids)
                    if reasoning:
                        deltas.append({"reasoning_content": reasoning})
                    if content:
                        deltas.append({"content": content})
                    if calls:
                        deltas.append({"tool_calls": calls})
                    if not deltas and (lp or finish):
                        deltas.append({})
                    for d, delta in enumerate(deltas):
                        is_last = d == len(deltas) - 1
                        yield {**head, "choices": [{"index": c.index, "delta": delta,
                                                    "logprobs": lp if is_last else None,
                                                    "finish_reason": finish if is_last else None}], **extra}

        return self._stream(chunks(), lambda: usage(last[0]), req.include_usage, head)


async def _off_loop(fn, size: int):
    """fn() on a worker thread when the request's body is over _INLINE_SIZE bytes, so the event loop keeps
    answering others meanwhile; a small request's work runs inline, where a thread hop would cost more.
    The body's size bounds the work: its text, its token ids and its item count are all in it."""
    return await asyncio.to_thread(fn) if size > _INLINE_SIZE else fn()


async def _disconnected(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
