"""The GRPO objective as pure tensor functions: group advantages, the clipped surrogate, k3 KL, metrics.

No model code: callers pass per-token log-probabilities of the sampled completion tokens. Equation
numbers refer to DeepSeekMath (arXiv 2402.03300) eq. 3-4; DAPO (arXiv 2503.14476) and Dr. GRPO
(arXiv 2503.20783) are cited by section; docs/design/grpo_sources.md summarises all three.

Key choices:
- Advantages (DeepSeekMath §4.1.2): A_i = (r_i - mean(group)) / (std(group) + eps), every token of
  o_i gets A_i. std is the *unbiased sample* std (Bessel, n - 1), i.e. `torch.std`'s default, as in
  TRL's GRPOTrainer (its advantages are (r - group mean) / (std + 1e-4); its code is
  `rewards.view(-1, G).std(dim=1)`) and verl; eps = 1e-4 is TRL's. `correction=0` gives the
  population std. Worked example (rewards 1.0, 0.7, 1.0, 0.0, mean 0.675): sample std 0.4717 ->
  A = 0.689, 0.053, 0.689, -1.431; population std 0.4085 -> 0.796, 0.061, 0.796, -1.652 (the
  0.435 quoted in the seed text is neither; an arithmetic slip).
- level="batch" (TRL scale_rewards="batch", "Lite PPO" arXiv 2508.08221): centre by each group's
  mean, divide by the std of all raw rewards of the batch. scale_std=False is Dr. GRPO (no std).
  Groups whose rewards are all equal get advantage exactly 0 in every mode.
- Loss = -objective. Aggregation (loss_type), the knob TRL's defaults changed three times:
  "grpo" = mean over each sequence's tokens, then over sequences (DeepSeekMath eq. 3, 1/|o_i|);
  "dr_grpo" = masked sum / (num_sequences * max_completion_length), a constant normaliser;
  "dapo" = masked sum / number of completion tokens (DAPO §3.3, token-level).
- Layout: rewards and advantages are prompt-major, the G completions of prompt 0 first.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
# R1 v2 Supp. C.2: the ten reflective words whose counts rise 5-7x during R1-Zero training.
REFLECTION_WORDS = ("wait", "mistake", "however", "but", "retry", "error", "verify", "wrong", "evaluate", "check")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def zero_variance_mask(rewards: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """(N*G,) bool: True for every completion whose group's rewards are all equal (max - min <= atol).

    Such groups have zero advantage and contribute no policy gradient; DAPO's dynamic sampling (§3.2)
    drops them and samples more prompts instead.
    """
    g = _groups(rewards, group_size)
    flat = (g.amax(dim=1) - g.amin(dim=1)) <= atol
    return flat.repeat_interleave(group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True, level: str = "group",
                     eps: float = 1e-4, correction: int = 1) -> torch.Tensor:
    """Outcome-supervision advantages, one per completion (DeepSeekMath §4.1.2).

    Args:
        rewards: (N*G,) total reward per completion, prompt-major.
        group_size: G, completions per prompt.
        scale_std: divide by std + eps (GRPO); False is Dr. GRPO's r - mean(group).
        level: "group" uses each group's std; "batch" the std of all rewards in the batch (the mean
            is always the group's).
        eps: added to the std (TRL's 1e-4), so tiny-spread groups do not explode.
        correction: std's Bessel correction, 1 = unbiased sample std (default, torch/TRL), 0 = population.

    Returns:
        (N*G,) advantages (float32 unless rewards are another float type); exactly 0 for zero-variance groups.
    """
    if level not in ("group", "batch"):
        raise ValueError(f"level must be 'group' or 'batch', got {level!r}")
    g = _groups(rewards if rewards.is_floating_point() else rewards.float(), group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale_std:
        # too few samples for the correction (e.g. G = 1): std 0; such groups are zeroed below anyway
        if level == "group":
            std = g.std(dim=1, correction=correction, keepdim=True) if group_size > correction else g.new_zeros(())
        else:
            std = g.std(correction=correction) if g.numel() > correction else g.new_zeros(())
        adv = adv / (std + eps)
    adv = adv.masked_fill(zero_variance_mask(rewards, group_size).view_as(adv), 0.0)
    return adv.reshape(-1)


def step_advantages(step_rewards: Sequence[Sequence[float]], group_size: int, eps: float = 1e-4,
                    correction: int = 1) -> list[list[float]]:
    """Process-supervision step rewards normalised within each group (DeepSeekMath §4.1.3).

    step_rewards[i] holds the rewards of completion i's steps (prompt-major, G completions per group).
    Each step reward becomes (r - mean(R)) / (std(R) + eps), R = every step reward of the group's G
    completions (sample std with `correction`, as group_advantages). A group with fewer than two steps
    or with all step rewards equal gets zeros: it says nothing about which steps were better.
    """
    if len(step_rewards) % group_size:
        raise ValueError(f"{len(step_rewards)} completions do not split into groups of {group_size}")
    out = []
    for g in range(0, len(step_rewards), group_size):
        group = step_rewards[g:g + group_size]
        flat = torch.tensor([r for steps in group for r in steps], dtype=torch.float64)
        if flat.numel() <= correction or bool((flat == flat[0]).all()):
            out += [[0.0] * len(steps) for steps in group]
            continue
        mean, std = flat.mean().item(), flat.std(correction=correction).item()
        out += [[(r - mean) / (std + eps) for r in steps] for steps in group]
    return out


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
              loss_type: str = "grpo", max_completion_length: int | None = None,
              num_tokens: int | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO surrogate with optional k3 KL, aggregated per `loss_type`.

    Args:
        logp: (B, T) log pi_theta of the sampled tokens (carries the gradient).
        old_logp: (B, T) log pi_old of the same tokens (sampling policy); detached here.
        ref_logp: (B, T) log pi_ref, or None (required when beta != 0).
        advantages: (B,) one advantage per completion (group_advantages, outcome supervision), or (B, T)
            one per token (process supervision, DeepSeekMath §4.1.3).
        mask: (B, T) 1 for completion tokens, 0 for padding (and for masked truncated samples).
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high]; DAPO Clip-Higher uses eps_high 0.28.
        beta: KL coefficient (DeepSeekMath 0.04, R1 0.001, TRL/DAPO/Dr. GRPO 0).
        loss_type: "grpo", "dr_grpo" or "dapo" (module docstring).
        max_completion_length: Dr. GRPO's constant L; required for "dr_grpo".
        num_tokens: "dapo" only: the token count to divide by, e.g. the completion tokens of the whole
            accumulated batch when it is split into micro-batches; default: this batch's.

    Returns:
        (loss, metrics): metrics are detached scalars over completion tokens: clip_frac_low (A < 0 and
        ratio < 1 - eps_low), clip_frac_high (A > 0 and ratio > 1 + eps_high), clip_frac (either; the
        tokens whose gradient the clip removes), ratio_mean, and kl (k3) when ref_logp is given.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    shapes = [tuple(t.shape) for t in (logp, old_logp, mask, ref_logp) if t is not None]
    if logp.dim() != 2 or len(set(shapes)) != 1:
        raise ValueError(f"logp, old_logp, mask (and ref_logp) must share one (B, T) shape, got {shapes}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must have shape ({logp.shape[0]},) or {tuple(logp.shape)}, "
                         f"got {tuple(advantages.shape)}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant normaliser)")

    m = mask.to(logp.dtype)
    A = advantages.to(logp.dtype)
    if A.dim() == 1:
        A = A.unsqueeze(1)  # DeepSeekMath §4.1.2: A_{i,t} = r~_i for every token
    ratio = torch.exp(logp - old_logp.detach())  # rho_{i,t}, DeepSeekMath eq. 3
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # DAPO §3.1 Clip-Higher: decoupled eps_low/eps_high
    per_token = -torch.min(ratio * A, clipped * A)  # DeepSeekMath eq. 3, negated: we minimise
    kl = None
    if ref_logp is not None:
        d = ref_logp.detach() - logp
        kl = torch.exp(d) - d - 1.0  # DeepSeekMath eq. 4, Schulman's k3: >= 0, unbiased for KL(pi_theta || pi_ref)
        if beta != 0:
            per_token = per_token + beta * kl

    if loss_type == "grpo":  # DeepSeekMath eq. 3: (1/G) sum_i (1/|o_i|) sum_t
        loss = ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":  # Dr. GRPO (arXiv 2503.20783): sum_i sum_t / (G * L), L constant
        loss = (per_token * m).sum() / (logp.shape[0] * max_completion_length)
    else:  # DAPO §3.3: sum_i sum_t / sum_i |o_i|
        loss = (per_token * m).sum() / (num_tokens if num_tokens else m.sum().clamp(min=1.0))

    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        low = ((ratio < 1.0 - eps_low) & (A < 0)).to(m.dtype) * m
        high = ((ratio > 1.0 + eps_high) & (A > 0)).to(m.dtype) * m
        metrics = {"clip_frac_low": low.sum() / n, "clip_frac_high": high.sum() / n,
                   "clip_frac": (low + high).sum() / n, "ratio_mean": (ratio * m).sum() / n}
        if kl is not None:
            metrics["kl"] = (kl * m).sum() / n
    return loss, metrics


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distribution over completion tokens.

    Args:
        logits: (B, T, V) policy logits at the positions that predict the completion tokens.
        mask: (B, T) 1 for completion tokens.
    The result keeps the graph (usable as an entropy bonus); wrap in torch.no_grad() to only log it.
    """
    if logits.shape[:2] != mask.shape:
        raise ValueError(f"logits (B, T, V) and mask (B, T) disagree: {tuple(logits.shape)} vs {tuple(mask.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)  # H = -sum_v p_v log p_v
    m = mask.to(h.dtype)
    return (h * m).sum() / m.sum().clamp(min=1.0)


def reflection_share(completions: Sequence[str], words: Sequence[str] = REFLECTION_WORDS) -> float:
    """Share of completions that use at least one reflective word (whole word, any case), in [0, 1].

    The default list is R1 v2 Supp. C.2's ten words; it includes common ones ("but", "however"), so
    compare the share across training steps rather than read it as an absolute count of reflection.
    Pass e.g. ("wait", "check", "verify") for a narrower signal.
    """
    if not completions or not words:
        return 0.0
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    return sum(bool(pattern.search(c)) for c in completions) / len(completions)
