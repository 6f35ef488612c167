"""MTP self-speculative decoding (V3 report §5.4.3; docs/design/mtp.md): the acceptance rule and the
bookkeeping of what the MTP module must see.

One engine step per running sequence with n committed tokens t_0..t_{n-1}:
1. draft: MTP module 0 at position n-2 reads the main model's hidden h_{n-2} and the embedding of
   t_{n-1} and predicts t_n (the draft d, sampled from its processed distribution q).
2. verify: one main-model forward of [t_{n-1}, d] at positions [n-1, n] gives the target
   distributions p_n (for t_n) and p_{n+1} (for t_{n+1} given d).
3. accept d with probability min(1, p_n(d) / q(d)) (greedy: iff argmax p_n == d); otherwise t_n is
   drawn from norm(max(0, p_n - q)). On acceptance t_{n+1} ~ p_{n+1} comes for free.
This is Leviathan et al. / Chen et al. speculative sampling: t_n is distributed exactly as p_n for
any q. Greedy rows use one-hot p and q, which turns the same rule into "accept iff argmax matches",
so greedy output is token-for-token plain greedy.

The MTP module's cache layer must hold every position below the one it drafts from. After a step
the main model's hidden states that the MTP module has not yet consumed are kept per sequence
(`Sequence.pending_h`): one (h_{n-1}) after a rejection, two (h_{n-1}, h_n) after an acceptance.
The next draft runs the MTP module over exactly those positions (a rejection pads with one junk
position, which the next step overwrites before anything attends to it, as it does for the rejected
draft's latent in the main cache).
"""

from __future__ import annotations

import torch

from .sampler import sample_from_probs


def acceptance_probability(p_B: torch.Tensor, q_B: torch.Tensor) -> torch.Tensor:
    """min(1, p(d) / q(d)) for the draft d (q(d) > 0 since d was drawn from q)."""
    return (p_B / q_B.clamp_min(1e-30)).clamp(max=1.0)


def residual_distribution(p_BV: torch.Tensor, q_BV: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)), the distribution of the replacement token after a rejection (unnormalized;
    where p <= q everywhere (p == q) acceptance was certain and p itself is returned)."""
    r = (p_BV - q_BV).clamp_min(0.0)
    empty = r.sum(-1, keepdim=True) <= 0
    return torch.where(empty, p_BV, r)


def verify_draft(p_BV: torch.Tensor, q_BV: torch.Tensor, draft_B: torch.Tensor, u_accept_B: torch.Tensor,
                 u_resample_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for one drafted token per row.

    Args:
        p_BV: target distribution at the draft's position; q_BV: the draft distribution d was drawn from.
        u_accept_B, u_resample_B: uniforms in [0, 1) from each row's generator.
    Returns:
        accepted (B,) bool and the committed token (B,): d where accepted, else a draw from the residual.
    """
    idx = draft_B[:, None]
    accept_prob = acceptance_probability(p_BV.gather(1, idx).squeeze(1).double(),
                                         q_BV.gather(1, idx).squeeze(1).double())
    accepted = u_accept_B.to(accept_prob) < accept_prob
    replacement = sample_from_probs(residual_distribution(p_BV, q_BV), u_resample_B)
    return accepted, torch.where(accepted, draft_B, replacement)


def mtp_inputs(seq, hidden_size: int) -> tuple[torch.Tensor, list[int], int, int]:
    """What the MTP module needs to draft t_n for a sequence with n committed tokens.

    Returns (h (2, D), the two next-token ids, the first position, which of the two rows predicts t_n).
    """
    n, h = seq.num_tokens, seq.pending_h
    if h.shape[0] == 2:   # after an acceptance: positions n-3, n-2 read h_{n-3}, h_{n-2} and t_{n-2}, t_{n-1}
        return h, [seq.token_at(n - 2), seq.token_at(n - 1)], n - 3, 1
    pad = torch.zeros(1, hidden_size, dtype=h.dtype, device=h.device)
    return torch.cat([h, pad]), [seq.token_at(n - 1), 0], n - 2, 0
