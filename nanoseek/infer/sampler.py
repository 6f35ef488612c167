"""From logits to tokens for a batch of sequences that each have their own SamplingParams.

Order (vLLM/HF): penalties on the raw logits -> temperature -> top-k -> top-p -> min-p -> softmax.
Greedy rows (temperature 0) take the argmax of the penalized logits; inside `probs` they become a
one-hot distribution, so speculative acceptance (nanoseek/infer/speculative.py) treats greedy and
sampled rows with one rule.

Randomness: every sequence owns a torch.Generator; a draw takes one float64 uniform per row from it
and inverts the row's CDF. A sequence's tokens thus depend only on its own seed and logits, never on
which other requests share the batch. Logprobs are reported under the raw model distribution
(log_softmax of the unprocessed logits), as vLLM does by default.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from .outputs import Logprob, PositionLogprobs
from .params import SamplingParams


def apply_penalties(logits_BV: torch.Tensor, prompt_mask_BV: torch.Tensor, output_counts_BV: torch.Tensor,
                    repetition_B: torch.Tensor, presence_B: torch.Tensor, frequency_B: torch.Tensor) -> torch.Tensor:
    """Repetition (HF/vLLM), presence and frequency (OpenAI) penalties; returns new logits.

    Args:
        prompt_mask_BV: bool, token occurs in the prompt.
        output_counts_BV: occurrences of each token in the generated output.
        repetition_B: > 0; tokens seen in prompt or output get logit / r if positive, logit * r otherwise.
        presence_B, frequency_B: logit -= presence * [count > 0] + frequency * count (output tokens only).
    """
    seen = prompt_mask_BV | (output_counts_BV > 0)
    r = repetition_B[:, None].to(logits_BV.dtype)
    penalized = torch.where(logits_BV > 0, logits_BV / r, logits_BV * r)
    logits_BV = torch.where(seen, penalized, logits_BV)
    counts = output_counts_BV.to(logits_BV.dtype)
    return (logits_BV - presence_B[:, None].to(logits_BV.dtype) * (counts > 0)
            - frequency_B[:, None].to(logits_BV.dtype) * counts)


def truncate(logits_BV: torch.Tensor, top_k_B: torch.Tensor | None, top_p_B: torch.Tensor | None,
             min_p_B: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) the tokens that top-k, then top-p, then min-p remove. None skips a filter.

    top_k_B: ints, vocab size (or more) = off; top_p_B: in (0, 1], 1 = off; min_p_B: in [0, 1], 0 = off.
    Top-p keeps the smallest prefix of the sorted distribution (renormalized after top-k) whose mass
    reaches top_p, so the most likely token always survives.
    """
    if top_k_B is not None or top_p_B is not None:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        V = logits_BV.shape[-1]
        drop_BV = torch.zeros_like(sorted_BV, dtype=torch.bool)
        if top_k_B is not None:
            drop_BV |= torch.arange(V, device=logits_BV.device)[None] >= top_k_B[:, None]
            sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        if top_p_B is not None:
            p_BV = sorted_BV.softmax(dim=-1)
            before_BV = p_BV.cumsum(dim=-1) - p_BV          # mass of the strictly more likely tokens
            drop_BV |= before_BV >= top_p_B[:, None].to(p_BV.dtype)
        logits_BV = logits_BV.masked_fill(torch.zeros_like(drop_BV).scatter_(1, order_BV, drop_BV), float("-inf"))
    if min_p_B is not None:
        p_BV = logits_BV.softmax(dim=-1)
        keep = p_BV >= min_p_B[:, None].to(p_BV.dtype) * p_BV.amax(dim=-1, keepdim=True)
        logits_BV = logits_BV.masked_fill(~keep, float("-inf"))
    return logits_BV


def sample_from_probs(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the first token whose cumulative probability exceeds u * total (u in [0, 1)).

    Tokens of probability 0 are never chosen; rows need not be normalized.
    """
    cdf_BV = probs_BV.double().cumsum(dim=-1)
    x_B1 = (u_B.to(cdf_BV) * cdf_BV[:, -1])[:, None]
    idx = torch.searchsorted(cdf_BV, x_B1, right=True).squeeze(1)
    return idx.clamp_(max=probs_BV.shape[-1] - 1)


class SamplingBatch:
    """The sampling settings of B sequences as tensors, built once per step.

    Args:
        params: SamplingParams per row.
        generators: torch.Generator per row (used for the non-greedy rows).
        prompt_ids, output_ids: token lists per row (read only when a row has penalties).
        vocab_size: width of the logits.
    """

    def __init__(self, params: Seq[SamplingParams], generators: Seq[torch.Generator],
                 prompt_ids: Seq[Seq[int]], output_ids: Seq[Seq[int]], vocab_size: int,
                 device: torch.device | str = "cpu"):
        self.params, self.generators, self.V, self.device = list(params), list(generators), vocab_size, device
        self.greedy = [p.greedy for p in params]
        self.all_greedy = all(self.greedy)
        self.greedy_B = torch.tensor(self.greedy, dtype=torch.bool, device=device)
        self.temperature_B = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                                          dtype=torch.float32, device=device)[:, None]
        sampled = [p for p in params if not p.greedy]
        self.top_k_B = (torch.tensor([p.top_k if p.top_k_enabled else vocab_size for p in params], device=device)
                        if any(p.top_k_enabled for p in sampled) else None)
        self.top_p_B = (torch.tensor([p.top_p for p in params], device=device)
                        if any(p.top_p < 1.0 for p in sampled) else None)
        self.min_p_B = (torch.tensor([p.min_p for p in params], device=device)
                        if any(p.min_p > 0 for p in sampled) else None)
        self.any_penalty = any(p.has_penalties for p in params)
        if self.any_penalty:
            B = len(self.params)
            self.prompt_mask_BV = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
            self.counts_BV = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)
            for b, p in enumerate(self.params):
                if p.has_penalties:
                    self.prompt_mask_BV[b, torch.tensor(prompt_ids[b], dtype=torch.long, device=device)] = True
                    out = torch.tensor(output_ids[b], dtype=torch.long, device=device)
                    self.counts_BV[b].index_add_(0, out, torch.ones(len(out), device=device))
            self.penalty_B3 = torch.tensor([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
                                            for p in params], device=device)

    def penalized(self, logits_BV: torch.Tensor, extra_B: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits with the penalties applied; `extra_B` counts one more output token per row
        (speculative verification of the token after a draft)."""
        logits_BV = logits_BV.float()
        if not self.any_penalty:
            return logits_BV
        counts = self.counts_BV
        if extra_B is not None:
            counts = counts.clone()
            counts[torch.arange(len(extra_B), device=counts.device), extra_B] += 1
        r, pres, freq = self.penalty_B3.unbind(-1)
        return apply_penalties(logits_BV, self.prompt_mask_BV, counts, r, pres, freq)

    def probs(self, logits_BV: torch.Tensor, extra_B: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution each row samples from (one-hot argmax for greedy rows)."""
        logits_BV = self.penalized(logits_BV, extra_B)
        greedy_BV = torch.zeros_like(logits_BV).scatter_(1, logits_BV.argmax(-1, keepdim=True), 1.0)
        if self.all_greedy:
            return greedy_BV
        x = truncate(logits_BV / self.temperature_B, self.top_k_B, self.top_p_B, self.min_p_B)
        return torch.where(self.greedy_B[:, None], greedy_BV, x.softmax(dim=-1))

    def uniforms(self) -> torch.Tensor:
        """One float64 uniform in [0, 1) per row from the row's generator (greedy rows draw nothing)."""
        return torch.tensor([0.5 if g else float(torch.rand((), generator=gen, dtype=torch.float64))
                             for g, gen in zip(self.greedy, self.generators)], dtype=torch.float64, device=self.device)

    def sample(self, logits_BV: torch.Tensor, extra_B: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row."""
        if self.all_greedy:
            return self.penalized(logits_BV, extra_B).argmax(-1)
        return sample_from_probs(self.probs(logits_BV, extra_B), self.uniforms())


def logprobs_of(logits_BV: torch.Tensor, tokens_B: torch.Tensor, n_top: Seq[int | None],
                decode=None) -> tuple[torch.Tensor, list[PositionLogprobs | None]]:
    """Raw-model logprobs of the chosen tokens (B,), and per row (None where n_top is None) a dict of the
    chosen token and the top-n alternatives, vLLM style (rank 1 = most likely)."""
    logits_BV = logits_BV.float()
    tokens_B = tokens_B.to(logits_BV.device)
    dicts: list[PositionLogprobs | None] = [None] * len(n_top)
    wanted = [b for b, n in enumerate(n_top) if n is not None]
    if not wanted:  # only the chosen tokens' logprobs (every decode step): x_t - logsumexp(x), no (B, V) output
        return logits_BV.gather(1, tokens_B[:, None]).squeeze(1) - logits_BV.logsumexp(dim=-1), dicts
    lp_BV = logits_BV.log_softmax(dim=-1)
    chosen_B = lp_BV.gather(1, tokens_B[:, None]).squeeze(1)
    rank_B = (lp_BV > chosen_B[:, None]).sum(-1) + 1
    k = min(max(n_top[b] for b in wanted), lp_BV.shape[-1])
    top_v, top_i = lp_BV.topk(k, dim=-1) if k > 0 else (lp_BV[:, :0], tokens_B[:, None][:, :0])
    for b in wanted:
        tok = int(tokens_B[b])
        d = {tok: Logprob(float(chosen_B[b]), int(rank_B[b]), decode(tok) if decode else None)}
        for r, (i, v) in enumerate(zip(top_i[b, :n_top[b]].tolist(), top_v[b, :n_top[b]].tolist()), start=1):
            if i not in d:
                d[i] = Logprob(v, r, decode(i) if decode else None)
        dicts[b] = d
    return chosen_B, dicts
