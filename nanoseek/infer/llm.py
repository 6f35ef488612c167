"""LLM: offline batch inference in vLLM's shape, `LLM(dir).generate(prompts, SamplingParams(...))`.

It owns an LLMEngine, feeds it every prompt at once and steps it until all are done; continuous
batching keeps max_num_seqs sequences decoding. `chat` renders conversations with the tokenizer's
chat template and splits R1 reasoning from the answer (nanoseek/infer/reasoning.py).
"""

from __future__ import annotations

import itertools
import os
from typing import Mapping, Sequence

import torch

from ..model import Transformer
from .engine import DEFAULT_CACHE_MEMORY_BYTES, EngineStats, LLMEngine
from .outputs import RequestOutput
from .params import SamplingParams
from .reasoning import prompt_opens_think, split_reasoning

PromptType = str | Mapping | Sequence[int]


class LLM:
    """Args:
        model: a checkpoint folder (config.json + safetensors, tokenizer.json used when present) or a Transformer.
        tokenizer: a nanoseek Tokenizer or a folder holding tokenizer.json (overrides the checkpoint's).
        max_num_seqs, max_model_len, cache_dtype, cache_memory_bytes, speculative, num_speculative_tokens,
            seed, compile: see LLMEngine.
        dtype: parameter dtype when loading a folder (default: the checkpoint's).
    """

    def __init__(self, model: str | os.PathLike | Transformer, tokenizer=None, max_num_seqs: int = 16,
                 max_model_len: int | None = None, cache_dtype: torch.dtype | None = None,
                 speculative: bool | str | None = False, num_speculative_tokens: int = 1, seed: int = 0,
                 cache_memory_bytes: int | None = DEFAULT_CACHE_MEMORY_BYTES, dtype: torch.dtype | None = None,
                 compile: bool = False):
        from ..checkpoint import from_pretrained
        from ..data.tokenizer import TOKENIZER_FILE, Tokenizer

        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            model = from_pretrained(path, dtype=dtype)
            if tokenizer is None and os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
                tokenizer = Tokenizer.load(path)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = Tokenizer.load(tokenizer)
        self.llm_engine = LLMEngine(model, tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                    cache_dtype=cache_dtype, cache_memory_bytes=cache_memory_bytes,
                                    speculative=speculative, num_speculative_tokens=num_speculative_tokens, seed=seed,
                                    compile=compile)
        self.model, self.tokenizer = model, tokenizer
        self._ids = itertools.count()

    @property
    def stats(self) -> EngineStats:
        return self.llm_engine.stats

    @property
    def spec_stats(self) -> dict:
        return self.llm_engine.spec_stats

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt: a str, {"prompt": str}, {"prompt_token_ids": [...]}, or a list of them.

        sampling_params: one for all prompts or one per prompt (default SamplingParams()).
        Returns one RequestOutput per prompt, in input order.
        """
        if isinstance(prompts, (str, Mapping)) or (isinstance(prompts, Sequence) and prompts
                                                   and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params(sampling_params, len(prompts))
        encoded = [self._encode(p) for p in prompts]
        return self._run(encoded, params, use_tqdm)

    def chat(self, messages: Sequence[Mapping] | Sequence[Sequence[Mapping]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = False,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Answer one conversation ([{"role", "content"}, ...]) or a list of them through the chat template.

        Each CompletionOutput also gets `reasoning_content` (inside <think>...</think>, None without a
        think block) and `content` (the rest).
        """
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        if not messages:
            raise ValueError("chat needs at least one message")
        convs = [messages] if isinstance(messages[0], Mapping) else list(messages)
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in convs]
        params = self._params(sampling_params, len(texts))
        outs = self._run([(t, self.tokenizer.encode(t)) for t in texts], params, use_tqdm)
        for text, out in zip(texts, outs):
            opened = prompt_opens_think(text)
            for c in out.outputs:
                c.reasoning_content, c.content = split_reasoning(c.text, opened)
        return outs

    # ---- helpers -------------------------------------------------------------------------------
    def _params(self, sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return [sampling_params or SamplingParams()] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts (give one, or one per prompt)")
        return params

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass {'prompt_token_ids': [...]} instead")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def _run(self, encoded: list[tuple[str | None, list[int]]], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [f"llm-{next(self._ids)}" for _ in encoded]
        try:
            for rid, (text, tokens), p in zip(ids, encoded, params):
                engine.add_request(rid, tokens, p, prompt=text)
        except ValueError:
            for rid in ids:
                engine.abort_request(rid)
            raise
        wanted, done = set(ids), {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while len(done) < len(ids):
            for out in engine.step(finished_only=True):
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[r] for r in ids]
