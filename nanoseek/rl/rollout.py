"""GRPO rollouts: G sampled completions per prompt from the inference engine, and their log-probabilities
under a policy from one padded forward.

Key choices:
- Sampling goes through `nanoseek.infer.LLM` (continuous batching over the latent cache): every prompt
  is one request with n = G, so the prompt is prefilled once and its cache row copied to the G slots.
  The engine holds the trainer's own Transformer, so optimizer updates (in place) are what it samples
  from next step; `sync_engine` is the one place that tells it the weights changed.
- Each request carries its own seed (derived from the run seed, the step and the prompt's index), so a
  completion depends only on (weights, seed): a resumed run samples exactly what the uninterrupted one did.
- Log-probabilities: rows are prompt + completion, right-padded (causal attention never looks right,
  so padding cannot change a real token); only the hidden states at the C completion positions go
  through lm_head, which avoids the prompt's (B, P, V) logits. Logits are divided by the sampling
  temperature, as TRL does, so log pi_theta is the distribution that was sampled at T != 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..infer import LLM, SamplingParams
from ..model import Transformer


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

    def select(self, rows: Sequence[int]) -> "Rollout":
        rows = list(rows)
        return Rollout([self.prompt_ids[i] for i in rows], [self.completion_ids[i] for i in rows],
                       [self.texts[i] for i in rows], [self.truncated[i] for i in rows],
                       [self.problems[i] for i in rows], sum(len(self.completion_ids[i]) for i in rows))


def request_seed(seed: int, step: int, index: int) -> int:
    """A per-request sampling seed: distinct for every (run seed, step, prompt), stable across resumes."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**63 - 1)


def sample_groups(llm: LLM, prompts: Sequence[list[int]], problems: Sequence, group_size: int, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, step: int = 0) -> Rollout:
    """G completions for each prompt, batched in the engine (one request with n=G per prompt)."""
    params = [SamplingParams(n=group_size, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=request_seed(seed, step, i)) for i in range(len(prompts))]
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


def pad_batch(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion rows for `completion_logprobs`.

    Returns:
        ids (B, S), completion targets (B, C), mask (B, C) (1 on real completion tokens) and the index
        (B, C) of the position whose hidden state predicts each completion token (P_b - 1 + t).
    """
    B = len(prompt_ids)
    S = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    C = max(1, max(len(c) for c in completion_ids))
    ids = torch.zeros(B, S, dtype=torch.long)
    targets = torch.zeros(B, C, dtype=torch.long)
    mask = torch.zeros(B, C)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        targets[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[b, :len(c)] = 1.0
    plen = torch.tensor([len(p) for p in prompt_ids])
    # predictor position of completion token t is P - 1 + t; clamp keeps padded t inside the row
    index = (plen[:, None] - 1 + torch.arange(C)[None]).clamp(max=S - 1)
    return ids.to(device), targets.to(device), mask.to(device), index.to(device)


def completion_logprobs(model: Transformer, ids: torch.Tensor, targets: torch.Tensor, index: torch.Tensor,
                        temperature: float = 1.0, with_entropy: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target_t | prefix) (B, C) for every completion position, and optionally the entropy (B, C).

    Gradients flow when called outside no_grad. The entropy is detached (for logging only).
    """
    h_BSD = model.hidden_states(ids)
    h_BCD = h_BSD.gather(1, index[..., None].expand(-1, -1, h_BSD.shape[-1]))
    logits = model.lm_head(h_BCD).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            logp_all = logits.detach() - lse.detach()[..., None]
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # H = -sum_v p_v log p_v
    return logp, entropy
