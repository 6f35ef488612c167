"""Inference: a vLLM-style engine over the latent cache (engine / scheduler / model runner / sampler /
sequence, one job per file), MTP self-speculative decoding, and the R1 reasoning split.

- params.py: SamplingParams; outputs.py: RequestOutput, CompletionOutput, Logprob.
- engine.py: LLMEngine (add_request / abort_request / step), the core the server drives.
- llm.py: LLM, offline generate() and chat().
- scheduler.py: continuous batching over cache slots; model_runner.py: the cache and the forwards.
- sampler.py: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.
- speculative.py: MTP drafting and the speculative acceptance rule.
- detokenizer.py: incremental detokenization; reasoning.py: <think> split, whole and streamed.
- tool_calls.py: DeepSeek tool-call tokens in the output -> OpenAI tool_calls, whole and streamed.
- generate.py: greedy_generate, the minimal reference decoder.
"""

from .engine import EngineStats, LLMEngine
from .generate import greedy_generate
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput
from .params import SamplingParams
from .reasoning import ReasoningStream, prompt_opens_think, split_reasoning

__all__ = ["LLM", "CompletionOutput", "EngineStats", "LLMEngine", "Logprob", "ReasoningStream", "RequestOutput",
           "SamplingParams", "greedy_generate", "prompt_opens_think", "split_reasoning"]
