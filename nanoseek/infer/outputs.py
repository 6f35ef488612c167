"""What the engine hands back: RequestOutput with one CompletionOutput per sample (vLLM's shapes).

Logprobs follow vLLM: per position a dict token_id -> Logprob holding the chosen (or prompt) token
and the top-N alternatives; `prompt_logprobs[0]` is None (the first token has no context).
Besides the cumulative `text`/`token_ids`, every CompletionOutput carries `delta_text` and
`delta_token_ids`: what is new since the previous RequestOutput of the same request (for streaming).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """log p of one token; rank is 1 for the most likely token; decoded_token its text (None without a tokenizer)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One sample of a request.

    Attributes:
        index: which of the request's n samples.
        text: the generated text so far (stop strings cut off; "" without a tokenizer).
        token_ids: the generated token ids so far (a stop token or the eos token stays in).
        cumulative_logprob: sum of the chosen tokens' logprobs under the model (before any processing).
        logprobs: per generated token, a dict of Logprob (only when SamplingParams.logprobs is set).
        finish_reason: None while running, then "stop" (eos, stop token or stop string) or "length".
        stop_reason: the stop string or stop token id that ended it (None for eos and "length").
        reasoning_content, content: for chat: the text inside <think>...</think> and the rest.
        delta_text, delta_token_ids: new since the previous output of this request.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    reasoning_content: str | None = None
    content: str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
