"""GRPO rollouts: G sampled completions per prompt from the inference engine, and their log-probabilities
under a policy from one padded forward.

Key choices:
- Sampling goes through `nanoseek.infer.LLM` (continuous batching over the latent cache): every prompt
  is one request with n = G, so the prompt is prefilled once and its cache row copied to the G slots.
  The engine holds the trainer's own Transformer, so optimizer updates (in place) are what it samples
  from next step; `sync_engine` is the one place that tells it the weights changed.
- Each request carries its own seed (derived from the run seed, the step and the prompt's index), so a
  completion depends only on (weights, seed): a resumed run samples exactly what the uninterrupted one did.
- Log-probabilities: each distinct prompt runs through the model once and its G completions attend to
  its latents (`Transformer.prefix_shared_hidden_states`), so the training forward does not repeat the
  prompt G times; prompts and completions are right-padded (masked keys, causal attention). Only the
  hidden states that predict completion tokens go through lm_head. Logits are divided by the sampling
  temperature, as TRL does, so log pi_theta is the distribution that was sampled at T != 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..infer import LLM, SamplingParams
from ..model import Transformer
from ..model.buckets import bucketed


@dataclass
class Rollout:
    """N*G completions, prompt-major (the G completions of prompt 0 first).

    Attributes:
        prompt_ids: (N*G) prompt token ids, each prompt repeated G times (shared lists).
        completion_ids: generated ids; an ending EOS stays in (the policy must learn to stop).
        texts: completion texts (special tokens dropped).
        truncated: True where generation hit max_tokens (finish_reason "length").
        problems: the problem each completion answers (repeated G times).
        gen_tokens: generated tokens in total.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    problems: list
    gen_tokens: int

    def __len__(self) -> int:
        return len(self.completion_ids)

    def __add__(self, other: "Rollout") -> "Rollout":
        return Rollout(self.prompt_ids + other.prompt_ids, self.completion_ids + other.completion_ids,
                       self.texts + other.texts, self.truncated + other.truncated, self.problems + other.problems,
                       self.gen_tokens + other.gen_tokens)


def request_seed(seed: int, step: int, index: int) -> int:
    """A per-request sampling seed: distinct for every (run seed, step, prompt), stable across resumes."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**63 - 1)


def sample_groups(llm: LLM, prompts: Sequence[list[int]], problems: Sequence, group_size: int, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, step: int = 0,
                  first_index: int = 0) -> Rollout:
    """G completions for each prompt, batched in the engine (one request with n=G per prompt). Prompt i is
    seeded as request `first_index + i` of the step (refills of a step continue the numbering)."""
    params = [SamplingParams(n=group_size, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=request_seed(seed, step, first_index + i)) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    ro = Rollout([], [], [], [], [], 0)
    for prompt, problem, out in zip(prompts, problems, outs):
        for c in out.outputs:
            ro.prompt_ids.append(prompt)
            ro.completion_ids.append(list(c.token_ids))
            ro.texts.append(c.text)
            ro.truncated.append(c.finish_reason == "length")
            ro.problems.append(problem)
            ro.gen_tokens += len(c.token_ids)
    return ro


def sync_engine(llm: LLM) -> None:
    """Tell the engine that the weights of its model changed in place (after an optimizer step).

    The model caches weight-derived tensors (MLA's folded decode projections) and the fused AdamW
    step does not bump the weights' version counters, so the model cannot see the update itself;
    `invalidate_caches()` of the engine or the model drops them. tests/test_grpo.py checks that an
    engine reused after an update samples what a fresh one does, so a stale cache cannot slip in.
    """
    for owner in (llm.llm_engine, llm.model):
        hook = getattr(owner, "invalidate_caches", None)
        if callable(hook):
            hook()


@dataclass
class ScoringBatch:
    """Completions under their prompts, right-padded, for `completion_logprobs`; each distinct prompt once.

    Attributes:
        prompt_ids: (N, P) the distinct prompts; prompt_lens: (N,) their lengths.
        completion_ids: (B, C) the completions, also the targets; group: (B,) the prompt of each.
        mask: (B, C) 1 on real completion tokens.
    """

    prompt_ids: torch.Tensor
    prompt_lens: torch.Tensor
    completion_ids: torch.Tensor
    group: torch.Tensor
    mask: torch.Tensor


def pad_batch(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
              device: torch.device | str = "cpu", bucket_limit: int = 0) -> ScoringBatch:
    """Group completions under their distinct prompts (equal token lists are one prompt) and pad both; with
    bucket_limit (the model's positions) > 0, to bucketed lengths within it (nanoseek/model/buckets.py: few
    distinct shapes for a CPU bf16 forward)."""
    groups: dict[tuple[int, ...], int] = {}
    group = [groups.setdefault(tuple(p), len(groups)) for p in prompt_ids]
    prompts = list(groups)
    P, B = max(map(len, prompts)), len(completion_ids)
    C = max(1, max(len(c) for c in completion_ids))
    if bucket_limit:
        P, C = max(P, min(bucketed(P), bucket_limit)), max(C, min(bucketed(C), bucket_limit - P))
    pids = torch.zeros(len(prompts), P, dtype=torch.long)
    cids = torch.zeros(B, C, dtype=torch.long)
    mask = torch.zeros(B, C)
    for n, p in enumerate(prompts):
        pids[n, :len(p)] = torch.tensor(p, dtype=torch.long)
    for b, c in enumerate(completion_ids):
        cids[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[b, :len(c)] = 1.0
    return ScoringBatch(pids.to(device), torch.tensor([len(p) for p in prompts], device=device), cids.to(device),
                        torch.tensor(group, device=device), mask.to(device))


def completion_logprobs(model: Transformer, batch: ScoringBatch, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target_t | prefix) (B, C) for every completion position, and optionally the entropy (B, C).

    Each prompt runs through the model once for all its completions (`prefix_shared_hidden_states`): with
    G = 8 that removes most prompt tokens from the training forward. Gradients flow when called outside
    no_grad. The entropy is detached (for logging only).
    """
    h_p, h_c = model.prefix_shared_hidden_states(batch.prompt_ids, batch.prompt_lens, batch.completion_ids,
                                                 batch.group)
    # completion token 0 is predicted at the prompt's last position, token t > 0 at completion position t-1
    h_last = h_p[batch.group, batch.prompt_lens[batch.group] - 1]
    h_BCD = torch.cat([h_last[:, None], h_c[:, :-1]], dim=1)
    logits = model.lm_head(h_BCD).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, batch.completion_ids[..., None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            logp_all = logits.detach() - lse.detach()[..., None]
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # H = -sum_v p_v log p_v
    return logp, entropy
