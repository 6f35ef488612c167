"""Per-request and per-sample state: tokens, text, stop conditions, logprobs, cache slot.

A Request owns n Sequences (one per sample). A Sequence commits tokens one at a time through
`append`, which applies the stop rules in vLLM's order (stop token -> stop string -> max_tokens),
and `output` records what is new since the last output, for streaming. Text is detokenized
incrementally: at every token when there are stop strings to look for, otherwise only when an output
asks for it (a sequence read once, at its end, is decoded in one call). While a sequence runs and has
stop strings, the last len(longest stop) - 1 characters are held back from `delta_text`, so a stop
string that is still forming never reaches a client.
"""

from __future__ import annotations

import torch

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, PositionLogprobs, RequestOutput
from .params import SamplingParams


class Sequence:
    def __init__(self, request: "Request", index: int, seed: int, tokenizer=None):
        self.request, self.index = request, index
        self.params: SamplingParams = request.params
        self.prompt_ids: list[int] = request.prompt_ids
        self.output_ids: list[int] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.detok = IncrementalDetokenizer(tokenizer, self.params.skip_special_tokens) if tokenizer else None
        self.text = ""
        self.cumulative_logprob = 0.0
        self.logprobs: list[PositionLogprobs] | None = [] if self.params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.slot: int | None = None
        self.pending_h = None        # speculative decoding: main-model hidden states the MTP module still needs
        self._sent_text = 0          # what earlier outputs already reported
        self._detok_tokens = 0       # output tokens already in `text` (lazy detokenization, no stop strings)
        self._sent_tokens = 0
        stops = self.params.stop
        self._holdback = max(map(len, stops)) - 1 if stops and not self.params.include_stop_str_in_output else 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def token_at(self, i: int) -> int:
        P = len(self.prompt_ids)
        return self.prompt_ids[i] if i < P else self.output_ids[i - P]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float, position_logprobs: PositionLogprobs | None,
               eos_token_id: int | None, max_tokens: int) -> bool:
        """Commit one generated token; returns True when the sequence is finished by it."""
        p = self.params
        self.output_ids.append(token)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(position_logprobs)
        is_eos = token == eos_token_id and not p.ignore_eos
        if is_eos or token in p.stop_token_ids:
            if self.detok and p.stop:
                self.text += (self.detok.add(token) + self.detok.flush() if p.include_stop_str_in_output
                              else self.detok.flush())
            return self._finish("stop", None if is_eos else token)
        old = len(self.text)
        at_length = len(self.output_ids) >= max_tokens
        if self.detok and p.stop:
            self.text += self.detok.add(token) + (self.detok.flush() if at_length else "")
            if self._check_stop_strings(old):
                return True
        return self._finish("length", None) if at_length else False

    def _sync_text(self) -> None:
        """Without stop strings, bring `text` up to the committed tokens (a stop token's text only with
        include_stop_str_in_output, as the eager path)."""
        if not self.detok or self.params.stop:
            return
        end = len(self.output_ids)
        if self.finish_reason == "stop" and not self.params.include_stop_str_in_output:
            end -= 1
        self.text += self.detok.extend(self.output_ids[self._detok_tokens:end], flush=self.finished)
        self._detok_tokens = len(self.output_ids)

    def _check_stop_strings(self, old_len: int) -> bool:
        longest = max(map(len, self.params.stop))
        start = max(0, old_len - longest + 1)
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[:i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        return self._finish("stop", s)

    def _finish(self, reason: str, stop_reason) -> bool:
        self.finish_reason, self.stop_reason = reason, stop_reason
        return True

    def output(self) -> CompletionOutput:
        """The sample so far, with the delta since the previous call."""
        self._sync_text()
        visible = len(self.text) if self.finished else max(self._sent_text, len(self.text) - self._holdback)
        delta_text = self.text[self._sent_text:visible]
        delta_ids = self.output_ids[self._sent_tokens:]
        self._sent_text, self._sent_tokens = visible, len(self.output_ids)
        return CompletionOutput(
            index=self.index, text=self.text, token_ids=list(self.output_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            delta_text=delta_text, delta_token_ids=delta_ids)


class Request:
    """One call of add_request: a prompt, its SamplingParams and n samples."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int,
                 max_tokens: int, tokenizer=None, prompt: str | None = None):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.max_tokens = max_tokens
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.seqs = [Sequence(self, j, _sample_seed(seed, j), tokenizer) for j in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_ids,
                             prompt_logprobs=self.prompt_logprobs, outputs=[s.output() for s in self.seqs],
                             finished=self.finished)


def _sample_seed(seed: int, index: int) -> int:
    """Sample 0 uses the request's seed itself (n=1 and n>1 agree on their first sample)."""
    return seed if index == 0 else (seed * 0x9E3779B1 + index) % (2**63 - 1)
