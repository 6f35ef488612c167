"""Serving throughput: concurrent streaming clients against `nanoseek serve`, vs the same workload through
offline `LLM.generate` (the peer: the same engine without HTTP, SSE and the engine thread hand-off).

The server runs as a subprocess (`python -m nanoseek.cli serve`), so client and server do not share a
GIL. `--clients` asyncio workers (httpx) each send streaming /v1/completions requests back to back until
`--requests` are done; every request has a `--prompt-len` token prompt (slices of the built-in corpus),
`ignore_eos` and exactly `--max-tokens` new tokens, so the work is fixed. Reported: generated tokens/s
and requests/s over the whole run, and p50/p90/p99 of time to first token (first streamed chunk) and of
the whole request. The offline row runs the same prompts and SamplingParams through LLM.generate with
the same max_num_seqs; the ratio server/offline is the serving overhead. The two alternate for
`--rounds` rounds (order flipped each round; the idle server uses no CPU meanwhile) and medians are
reported, so background load hits both sides alike.

    python benchmarks/bench_server.py                          # `small` preset, random weights, 32 clients
    python benchmarks/bench_server.py path/to/model --clients 32 --requests 128 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import machine_info

import httpx

import nanoseek
from nanoseek.data import Tokenizer, default_corpus, train_tokenizer
from nanoseek.infer import LLM, SamplingParams


def build_default_model(directory: str, preset: str, seed: int) -> None:
    """A random `preset` model with a tokenizer trained on the built-in corpus, saved into `directory`."""
    tok = train_tokenizer(default_corpus(2000), vocab_size=nanoseek.ModelConfig.preset(preset).vocab_size)
    model = nanoseek.build_model(nanoseek.ModelConfig.preset(preset, vocab_size=tok.vocab_size), seed=seed)
    nanoseek.save_pretrained(model, directory)
    tok.save(directory)


def make_prompts(tok: Tokenizer, count: int, length: int) -> list[list[int]]:
    ids = [t for doc in default_corpus(400) for t in tok.encode(doc)]
    return [ids[(i * 97) % (len(ids) - length):][:length] for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanoseek.cli", "serve", args.model, "--port", str(port), "--max-num-seqs",
           str(args.max_num_seqs), "--served-model-name", "bench", "--log-level", "warning"]
    if args.speculative:
        cmd += ["--speculative", args.speculative]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.2)


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streamed completion."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0, tokens


async def run_clients(client: httpx.AsyncClient, prompts: list[list[int]], args
                      ) -> tuple[float, list[tuple[float, float, int]]]:
    """Wall time and per-request (TTFT, total, tokens) of all prompts over args.clients concurrent workers."""
    results: list[tuple[float, float, int]] = []
    next_i = iter(range(len(prompts)))

    async def worker():
        for i in next_i:
            results.append(await one_request(client, request_body(prompts, i, args)))

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(args.clients)])
    return time.perf_counter() - t0, results


def request_body(prompts: list[list[int]], i: int, args) -> dict:
    return {"model": "bench", "prompt": prompts[i], "max_tokens": args.max_tokens, "temperature": args.temperature,
            "seed": i, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def make_offline(args):
    """An offline LLM like the server's, and a callable that runs the workload through LLM.generate."""
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = nanoseek.from_pretrained(args.model, device=device)
    llm = LLM(model, Tokenizer.load(args.model), max_num_seqs=args.max_num_seqs, speculative=args.speculative or False)

    def run(prompts: list[list[int]]) -> float:
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=i, ignore_eos=True)
                  for i in range(len(prompts))]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        dt = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outs)
        return dt

    return run


async def alternate(url: str, prompts: list[list[int]], args, offline_run) -> tuple[list, list, list]:
    """Server and offline runs, alternating; returns (server walls, server results, offline walls)."""
    server_walls, results, offline_walls = [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=args.clients + 4)) as client:
        await one_request(client, request_body(prompts, 0, args))  # warm-up
        if offline_run:
            offline_run(prompts[:1])
        for r in range(args.rounds):
            order = ["server", "offline"] if r % 2 == 0 else ["offline", "server"]
            for side in order:
                if side == "server":
                    wall, res = await run_clients(client, prompts, args)
                    server_walls.append(wall)
                    results += res
                elif offline_run:
                    offline_walls.append(offline_run(prompts))
    return server_walls, results, offline_walls


def pct(xs: list[float]) -> str:
    p50, p90, p99 = np.percentile(np.array(xs) * 1000, [50, 90, 99])
    return f"{p50:8.0f} {p90:8.0f} {p99:8.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="model folder (default: build a random --preset model)")
    ap.add_argument("--preset", default="small", help="preset for the default model (default: small)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: 32)")
    ap.add_argument("--requests", type=int, default=None, help="total requests (default: 2 x clients)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request (default: 32)")
    ap.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request (default: 64)")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="server cache slots (default: 32)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    ap.add_argument("--speculative", default=None, choices=["mtp"], help="MTP speculative decoding on the server")
    ap.add_argument("--device", default=None, help="server device (default: cuda if available, else cpu)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of server and offline peer (default: torch's; 1 is steadier on a busy CPU)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating server/offline rounds (default: 3)")
    ap.add_argument("--no-offline", action="store_true", help="skip the offline LLM.generate peer row")
    args = ap.parse_args()
    requests = args.requests or 2 * args.clients
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = tmp
            t0 = time.perf_counter()
            build_default_model(tmp, args.preset, seed=0)
            print(f"built a random {args.preset!r} model with a trained tokenizer in {time.perf_counter() - t0:.1f}s")
            label = f"{args.preset} (random weights)"
        else:
            label = args.model
        prompts = make_prompts(Tokenizer.load(args.model), requests, args.prompt_len)
        offline_run = None if args.no_offline else make_offline(args)
        port = free_port()
        proc = start_server(args, port)
        try:
            server_walls, results, offline_walls = asyncio.run(
                alternate(f"http://127.0.0.1:{port}", prompts, args, offline_run))
        finally:
            proc.terminate()
            proc.wait(30)

    print(machine_info())
    print(f"model {label}; {requests} requests x ({args.prompt_len} prompt + {args.max_tokens} new tokens), "
          f"{args.clients} concurrent streaming clients, max_num_seqs {args.max_num_seqs}, temperature "
          f"{args.temperature}{', MTP speculative' if args.speculative else ''}; {args.rounds} rounds, medians")
    ttft, total, tokens = zip(*results)
    assert all(t == args.max_tokens for t in tokens), "a request generated fewer tokens than asked"
    gen = requests * args.max_tokens
    wall = float(np.median(server_walls))
    print(f"{'':22} {'tokens/s':>9} {'req/s':>7} {'wall s':>7} | {'TTFT ms p50':>11} {'p90':>8} {'p99':>8} | "
          f"{'total ms p50':>12} {'p90':>8} {'p99':>8}")
    print(f"{'server (HTTP + SSE)':22} {gen / wall:9.1f} {requests / wall:7.2f} {wall:7.2f} | {pct(ttft):>29} | "
          f"{pct(total):>30}")
    if offline_walls:
        off = float(np.median(offline_walls))
        print(f"{'offline LLM.generate':22} {gen / off:9.1f} {requests / off:7.2f} {off:7.2f} |")
        walls = ", ".join(f"{w:.2f}" for w in server_walls)
        print(f"server / offline throughput: {off / wall:.2f}x  (server walls {walls} s; offline "
              f"{', '.join(f'{w:.2f}' for w in offline_walls)} s)")


if __name__ == "__main__":
    main()
