"""LLM: offline batch inference in vLLM's shape, `LLM(dir).generate(prompts, SamplingParams(...))`.

It owns an LLMEngine, feeds it every prompt at once and steps it until all are done; continuous
batching keeps max_num_seqs sequences decoding. `chat` renders conversations with the tokenizer's
chat template (tools and template kwargs such as V3.1's `thinking` included), splits R1 reasoning from
the answer (nanoseek/infer/reasoning.py) and parses DeepSeek tool calls (nanoseek/infer/tool_calls.py).

Sampling defaults come from the checkpoint's generation_config.json, as with vLLM's `--generation-config
auto` (its default): the fields vLLM reads (temperature, top_p, top_k, min_p, repetition_penalty,
max_new_tokens -> max_tokens) replace SamplingParams' defaults wherever a request leaves them unset, e.g.
DeepSeek-R1's temperature 0.6 and top_p 0.95. Values equal to transformers' GenerationConfig defaults are
skipped (vLLM reads the file's difference from them); `do_sample` is not read (vLLM does not either).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Mapping, Sequence

import torch

from ..model import Transformer
from .engine import DEFAULT_CACHE_MEMORY_BYTES, EngineStats, LLMEngine
from .outputs import RequestOutput
from .params import SamplingParams
from .reasoning import prompt_opens_think, split_reasoning
from .tool_calls import parse_tool_calls

PromptType = str | Mapping | Sequence[int]
GENERATION_CONFIG_FILE = "generation_config.json"
# generation_config.json key -> SamplingParams field, and transformers' GenerationConfig default (skipped, as vLLM does)
_GENERATION_FIELDS = {"temperature": ("temperature", 1.0), "top_p": ("top_p", 1.0), "top_k": ("top_k", 50),
                      "min_p": ("min_p", None), "repetition_penalty": ("repetition_penalty", 1.0),
                      "max_new_tokens": ("max_tokens", None)}


class LLM:
    """Args:
        model: a checkpoint folder (config.json + safetensors, tokenizer.json used when present) or a Transformer.
        tokenizer: a nanoseek Tokenizer or a folder holding tokenizer.json (overrides the checkpoint's).
        max_num_seqs, max_model_len, cache_dtype, cache_memory_bytes, speculative, num_speculative_tokens,
            seed, compile: see LLMEngine.
        dtype: parameter dtype when loading a folder (default: the checkpoint's).
        generation_config: where sampling defaults come from (vLLM's flag): "auto" = the model folder's
            generation_config.json when it has one, "vllm" or None = none (SamplingParams' own), or a folder
            holding a generation_config.json.
        override_generation_config: defaults that win over the file's ({"temperature": 0.3}; its key names).
        keep_fp8: keep an FP8 checkpoint's weights in FP8, dequantized layer by layer (`from_pretrained`).
    """

    def __init__(self, model: str | os.PathLike | Transformer, tokenizer=None, max_num_seqs: int = 16,
                 max_model_len: int | None = None, cache_dtype: torch.dtype | None = None,
                 speculative: bool | str | None = False, num_speculative_tokens: int = 1, seed: int = 0,
                 cache_memory_bytes: int | None = DEFAULT_CACHE_MEMORY_BYTES, dtype: torch.dtype | None = None,
                 compile: bool = False, generation_config: str | os.PathLike | None = "auto",
                 override_generation_config: Mapping[str, Any] | None = None, keep_fp8: bool = False):
        from ..checkpoint import from_pretrained
        from ..data.tokenizer import TOKENIZER_FILE, Tokenizer

        path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        self.generation_defaults = generation_defaults(generation_config, path, override_generation_config)
        if path is not None:
            model = from_pretrained(path, dtype=dtype, keep_fp8=keep_fp8)
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

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the generation-config defaults applied (what generate/chat use when given none)."""
        return SamplingParams(**self.generation_defaults)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt: a str, {"prompt": str}, {"prompt_token_ids": [...]}, or a list of them.

        sampling_params: one for all prompts or one per prompt (default: get_default_sampling_params()).
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
             add_generation_prompt: bool = True, tools: Sequence[Mapping] | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Answer one conversation ([{"role", "content"}, ...]) or a list of them through the chat template.

        Args:
            tools: OpenAI tool schemas rendered by the template; the output's DeepSeek tool calls are parsed.
            chat_template_kwargs: more template variables, e.g. {"thinking": True} for DeepSeek-V3.1.
            chat_template: the name of one of the tokenizer's templates.
        Each CompletionOutput also gets `reasoning_content` (inside <think>...</think>, None without a think
        block; a template that opens the block itself, as R1's does, is accounted for), `content` (the rest)
        and `tool_calls` (OpenAI's [{"id", "type", "function": {"name", "arguments"}}]; with tools, the
        content is the text before the calls, and special tokens stay in the text so the call tokens can be read).
        """
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        if not messages:
            raise ValueError("chat needs at least one message")
        convs = [messages] if isinstance(messages[0], Mapping) else list(messages)
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tools=tools,
                                                    chat_template=chat_template, **(chat_template_kwargs or {}))
                 for c in convs]
        params = self._params(sampling_params, len(texts))
        if tools:  # the tool-call tokens must survive decoding even where a tokenizer marks them special
            params = [dataclasses.replace(p, skip_special_tokens=False) for p in params]
        outs = self._run([(t, self.tokenizer.encode(t)) for t in texts], params, use_tqdm)
        for text, out in zip(texts, outs):
            opened = prompt_opens_think(text)
            for c in out.outputs:
                c.reasoning_content, c.content = split_reasoning(c.text, opened)
                c.tool_calls = []
                if tools:
                    c.content, c.tool_calls = parse_tool_calls(c.content)
        return outs

    # ---- helpers -------------------------------------------------------------------------------
    def _params(self, sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return [sampling_params or self.get_default_sampling_params()] * count
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


def generation_defaults(source: str | os.PathLike | None, model_dir: str | None = None,
                        overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SamplingParams keyword defaults from a generation_config.json (see the module docstring).

    Args:
        source: "auto" (model_dir's file, if there is one), "vllm" or None (no file), or a folder with the file.
        model_dir: the model folder, for "auto".
        overrides: generation_config.json keys that win over the file's.
    Raises FileNotFoundError for a folder without the file, CheckpointError naming the file for a value
    SamplingParams refuses, ValueError for an unknown source or override key.
    """
    from ..checkpoint import CheckpointError
    from ..files import read_json

    config, file = {}, None
    if source not in (None, "vllm"):
        folder = model_dir if source == "auto" else os.fspath(source)
        file = os.path.join(folder, GENERATION_CONFIG_FILE) if folder else None
        if source != "auto" and (not os.path.isdir(folder) or not os.path.isfile(file)):
            raise FileNotFoundError(f"generation config {source!r}: expected 'auto', 'vllm' or a folder holding "
                                    f"{GENERATION_CONFIG_FILE}")
        if file and os.path.isfile(file):
            config = read_json(file, error=CheckpointError)
    unknown = sorted(set(overrides or {}) - set(_GENERATION_FIELDS))
    if unknown:
        raise ValueError(f"override_generation_config: unknown keys {unknown}; known: {sorted(_GENERATION_FIELDS)}")
    out = {field: config[key] for key, (field, hf_default) in _GENERATION_FIELDS.items()
           if config.get(key) is not None and config[key] != hf_default}
    out.update({_GENERATION_FIELDS[k][0]: v for k, v in (overrides or {}).items()})
    try:
        SamplingParams(**out)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file or 'override_generation_config'}: {e}") from None
    return out
