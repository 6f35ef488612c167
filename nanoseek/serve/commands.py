"""The `generate`, `chat` and `serve` command-line stages.

- generate: one prompt, the completion streamed to stdout as tokens arrive (stats on stderr).
- chat: a REPL on stdin that keeps the conversation, streams the reply and shows R1 reasoning dimmed
  (on a terminal) or prefixed with "[reasoning] " (piped); `/reset` and `/exit`; EOF exits.
- serve: the OpenAI-compatible server (nanoseek/serve/app.py) under uvicorn, on 127.0.0.1 by default.

All three drive the same LLMEngine: `generate`/`chat` step it in the foreground, `serve` hands it to
the background EngineRunner. FastAPI and uvicorn are imported only by `serve`.

The model folder may be nanoseek's or a released DeepSeek model's (its tokenizer.json, special tokens and
chat template). Sampling flags left unset take the folder's generation_config.json values (vLLM's
`--generation-config auto`), then the built-in defaults shown in --help.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterator

_DIM, _RESET = "\x1b[2m", "\x1b[0m"
_SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "top_k": -1}  # when neither a flag nor the folder sets one


def add_parsers(sub) -> None:
    """Register the generate, chat and serve sub-commands on an argparse sub-parsers object."""
    p = sub.add_parser("generate", help="complete one prompt, streaming the text to stdout")
    _model_flags(p)
    p.add_argument("--prompt", required=True, help="the prompt text (use - to read it from stdin)")
    _sampling_flags(p, max_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat on stdin (/reset, /exit; shows R1 reasoning dimmed)")
    _model_flags(p)
    _sampling_flags(p, max_tokens=1024)
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--chat-template-kwargs", type=_json_object, default=None, metavar="JSON",
                   help='more chat-template variables, e.g. \'{"thinking": true}\' for DeepSeek-V3.1')
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSEEK_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")
    # Request limits (nanoseek/serve/protocol.py ServerLimits); None = its default, named in the help.
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body; bigger ones get 413 before parsing (default: 33554432 = 32 MiB)")
    p.add_argument("--max-stop-strings", type=int, default=None, help="most stop strings per request (default: 4)")
    p.add_argument("--max-stop-length", type=int, default=None,
                   help="longest stop string in characters (default: 240)")
    p.add_argument("--max-stop-token-ids", type=int, default=None,
                   help="most stop_token_ids per request (default: 128)")
    p.set_defaults(func=cmd_serve)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF-format checkpoint folder with tokenizer.json (e.g. written by nanoseek train)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences decoded at once = cache slots (default: 1 for generate/chat, 16 for serve)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--speculative", default=None, choices=["mtp"], help="MTP self-speculative decoding")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode steps: the first requests wait for the compile (up to a minute), "
                        "later steps run faster (LLMEngine compile)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="load weights holding NaN/Inf (default: refuse them, naming the tensor)")
    p.add_argument("--keep-fp8", action="store_true",
                   help="keep an FP8 checkpoint's weights in FP8, dequantized layer by layer (half of bf16's memory)")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="sampling defaults: 'auto' = the folder's generation_config.json (e.g. DeepSeek-R1's "
                        "temperature 0.6, top-p 0.95), 'vllm' = none, or a folder holding one (default: auto); "
                        "flags and request fields win over it")


def _sampling_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.set_defaults(default_max_tokens=max_tokens)
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens to generate (default: the generation config's max_new_tokens, else {max_tokens})")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the generation config's, else 0.7)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass (default: the generation config's, else 1.0 = off)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens (default: the generation config's, else -1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def check_flags(args) -> None:
    """The flags of generate, chat and serve, checked before the model loads (a typo costs no load time);
    ValueError naming the flag."""
    import torch

    from ..cli import require_flags

    require_flags(args, max_num_seqs=1, max_model_len=1, max_tokens=1)
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (got {port})")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if hasattr(args, "temperature"):
        _params(args, args.max_tokens or args.default_max_tokens, {})
    from ..infer.llm import generation_defaults
    try:  # a missing or invalid generation config fails here, before the model loads
        generation_defaults(args.generation_config, args.model)
    except FileNotFoundError as e:
        raise ValueError(f"--generation-config {args.generation_config}: {e}") from None


def load_llm(args, default_seqs: int, chat: bool = False):
    """An LLM for the model folder in args (its tokenizer.json required), on args.device; its sampling defaults
    from --generation-config. `chat`: the tokenizer must have a chat template (checked before the weights load)."""
    import torch

    from ..checkpoint import from_pretrained
    from ..data.tokenizer import Tokenizer
    from ..infer.llm import LLM
    from ..runtime import local_device

    check_flags(args)
    tokenizer = Tokenizer.load(args.model)
    if chat:
        tokenizer.require_chat_template()
    try:
        device = local_device(args.device)
    except ValueError as e:
        raise ValueError(f"--device {args.device}: {e}") from None
    model = from_pretrained(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=device,
                            allow_non_finite=args.allow_non_finite, keep_fp8=args.keep_fp8)
    seqs = default_seqs if args.max_num_seqs is None else args.max_num_seqs
    generation_config = args.generation_config
    if generation_config == "auto":  # the model object carries no folder: name it
        generation_config = args.model if os.path.isfile(os.path.join(args.model, "generation_config.json")) else "vllm"
    return LLM(model, tokenizer, max_num_seqs=seqs, max_model_len=args.max_model_len,
               speculative=args.speculative or False, compile=args.compile, generation_config=generation_config)


def _params(args, max_tokens: int, defaults: dict):
    """SamplingParams from the flags; an unset flag takes `defaults` (the generation config), then
    _SAMPLING_DEFAULTS."""
    from ..infer.params import SamplingParams

    chosen = {k: getattr(args, k) if getattr(args, k) is not None else defaults.get(k, _SAMPLING_DEFAULTS[k])
              for k in _SAMPLING_DEFAULTS}
    return SamplingParams(max_tokens=max_tokens, seed=args.seed, **chosen)


def _max_tokens(args, llm) -> int:
    """--max-tokens, else the generation config's max_new_tokens, else the command's default."""
    if args.max_tokens is not None:
        return args.max_tokens
    return llm.generation_defaults.get("max_tokens", args.default_max_tokens)


def stream_request(engine, request_id: str, ids: list[int], params) -> Iterator:
    """Run one request on an idle engine, yielding its CompletionOutput (with delta_text) per step.

    The request is aborted if the consumer stops early (e.g. on Ctrl-C).
    """
    engine.add_request(request_id, ids, params)
    done = False
    try:
        while not done:
            for out in engine.step():
                if out.request_id == request_id:
                    done = out.finished
                    yield out.outputs[0]
    finally:
        if not done:
            engine.abort_request(request_id)


def cmd_generate(args) -> None:
    """Complete --prompt and stream the text to stdout; tokens/s (and MTP acceptance) go to stderr."""
    llm = load_llm(args, default_seqs=1)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = llm.tokenizer.encode(prompt)
    engine = llm.llm_engine
    max_tokens = min(_max_tokens(args, llm), engine.max_model_len - len(ids))
    if max_tokens < 1:
        raise ValueError(f"the prompt ({len(ids)} tokens) leaves no room in max_model_len={engine.max_model_len} "
                         "(--max-model-len)")
    t0, out = time.perf_counter(), None
    for out in stream_request(engine, "generate", ids, _params(args, max_tokens, llm.generation_defaults)):
        sys.stdout.write(out.delta_text)
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    n = len(out.token_ids) if out else 0
    spec = (f", MTP acceptance {engine.spec_stats['acceptance_rate']:.0%}" if engine.speculative else "")
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s, finish_reason {out.finish_reason if out else None}"
          f"{spec}]", file=sys.stderr)


def cmd_chat(args) -> None:
    """A REPL: each stdin line is a user turn; /reset forgets the conversation, /exit (or EOF) quits."""
    from ..infer.reasoning import ReasoningStream, prompt_opens_think

    llm = load_llm(args, default_seqs=1, chat=True)
    tok, engine = llm.tokenizer, llm.llm_engine
    max_tokens, template_kwargs = _max_tokens(args, llm), args.chat_template_kwargs or {}
    tty_in, tty_out = sys.stdin.isatty(), sys.stdout.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    if tty_in:
        print(f"nanoseek chat ({args.model}); /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    turn = 0
    while True:
        if tty_in:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            print("(conversation cleared)")
            continue
        history.append({"role": "user", "content": line})
        while True:  # drop the oldest turns until the prompt leaves room for a reply
            text = tok.apply_chat_template(system + history, add_generation_prompt=True, **template_kwargs)
            ids = tok.encode(text)
            room = engine.max_model_len - len(ids)
            if room >= min(max_tokens, 16) or len(history) <= 1:
                break
            del history[:2]
        if room < 1:
            print(f"(message too long: {len(ids)} tokens, max_model_len {engine.max_model_len})", file=sys.stderr)
            history.pop()
            continue
        splitter, in_reasoning, content = ReasoningStream(prompt_opens_think(text)), False, []
        turn += 1
        try:
            params = _params(args, min(max_tokens, room), llm.generation_defaults)
            for out in stream_request(engine, f"chat-{turn}", ids, params):
                r, c = splitter.feed(out.delta_text)
                if out.finish_reason:
                    r2, c2 = splitter.finish()
                    r, c = r + r2, c + c2
                if r:
                    if not in_reasoning:
                        sys.stdout.write(_DIM if tty_out else "[reasoning] ")
                        in_reasoning = True
                    sys.stdout.write(r)
                if c:
                    if in_reasoning:
                        sys.stdout.write(_RESET if tty_out else "\n")
                        in_reasoning = False
                    content.append(c)
                    sys.stdout.write(c)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        if in_reasoning and tty_out:
            sys.stdout.write(_RESET)
        sys.stdout.write("\n")
        sys.stdout.flush()
        # R1 practice: earlier turns keep only their answers, not their reasoning
        history.append({"role": "assistant", "content": "".join(content).strip()})


def cmd_serve(args) -> None:
    """Load the model and serve it over HTTP until interrupted."""
    import uvicorn

    from .app import create_app

    llm = load_llm(args, default_seqs=16)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    engine = llm.llm_engine
    print(f"serving {name!r} from {args.model} on http://{args.host}:{args.port}/v1 "
          f"({engine.max_num_seqs} sequences, max_model_len {engine.max_model_len}"
          f"{', MTP speculative' if engine.speculative else ''}{', API key required' if args.api_key else ''}); "
          f"{engine.cache_info}", file=sys.stderr)
    limits = {k: getattr(args, k) for k in ("max_body_bytes", "max_stop_strings", "max_stop_length",
                                            "max_stop_token_ids") if getattr(args, k) is not None}
    uvicorn.run(create_app(llm, name, api_key=args.api_key, **limits), host=args.host, port=args.port,
                log_level=args.log_level, timeout_graceful_shutdown=5)
