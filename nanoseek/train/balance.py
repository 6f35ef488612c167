"""Expert load balancing for DeepSeekMoE training (V3 report §2.1.2; v3_spec.md §4.4-4.5).

- Auxiliary-loss-free balancing: after each optimizer step, b_i += gamma * sign(mean_load - load_i),
  on the batch's token counts, outside autograd. The bias only changes which experts are selected.
- Complementary sequence-wise balance loss (eqs. 17-20), alpha tiny (1e-4 in V3).
- The classic batch-wise auxiliary loss (V2 expert-level loss) for comparisons.
- MaxVio = (max_i load_i - mean load) / mean load, the report's balance metric.
"""

from __future__ import annotations

import torch

from ..model import Transformer


def _routing(model: Transformer):
    for name, moe in model.moe_layers():
        if moe.routing is not None:
            yield name, moe.routing


def sequence_balance_loss(model: Transformer, batch_size: int, alpha: float) -> torch.Tensor:
    """alpha * sum_i f_i P_i per sequence (eqs. 17-20), averaged over sequences and MoE layers."""
    losses = []
    for _, (scores, idx) in _routing(model):
        N, E = scores.shape
        K = idx.shape[1]
        T = N // batch_size
        s = scores.view(batch_size, T, E)
        s_norm = s / s.sum(-1, keepdim=True)                                   # s'_{i,t}
        counts = torch.zeros(batch_size, E, device=s.device).scatter_add_(
            1, idx.view(batch_size, T * K), torch.ones(batch_size, T * K, device=s.device))
        f = counts * (E / (K * T))                                              # f_i
        P = s_norm.mean(1)                                                      # P_i
        losses.append((f * P).sum(-1).mean())
    if not losses:
        return torch.zeros(())
    return alpha * torch.stack(losses).mean()


def batch_aux_loss(model: Transformer, alpha: float) -> torch.Tensor:
    """The classic expert-level auxiliary loss over the whole batch (V2 report eq. 23 style)."""
    losses = []
    for _, (scores, idx) in _routing(model):
        N, E = scores.shape
        K = idx.shape[1]
        f = torch.bincount(idx.flatten(), minlength=E).float() * (E / (K * N))
        P = (scores / scores.sum(-1, keepdim=True)).mean(0)
        losses.append((f * P).sum())
    if not losses:
        return torch.zeros(())
    return alpha * torch.stack(losses).mean()


class LoadTracker:
    """Sums per-expert token counts over the micro-batches of one optimizer step."""

    def __init__(self, model: Transformer):
        self.model = model
        self.counts: dict[str, torch.Tensor] = {}

    def accumulate(self) -> None:
        """Add the counts of the MoE layers that ran in the last training forward (an MTP layer whose loss
        is off does not run, and must not count as perfectly balanced), then drop their routing tensors."""
        for name, moe in self.model.moe_layers():
            if moe.routing is None:
                continue
            c = moe.tokens_per_expert.float()
            self.counts[name] = self.counts[name] + c if name in self.counts else c
            moe.routing = None

    def max_vio(self) -> dict[str, float]:
        out = {}
        for name, c in self.counts.items():
            mean = c.mean()
            out[name] = float((c.max() - mean) / mean) if mean > 0 else 0.0
        return out

    def loads(self) -> dict[str, list[float]]:
        """Fraction of routed tokens per expert, per layer (for the heatmap)."""
        return {name: (c / c.sum().clamp(min=1)).tolist() for name, c in self.counts.items()}

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """b_i += gamma * sign(mean_load - load_i) on the batch loads (aux-loss-free balancing)."""
        if gamma > 0:
            for name, moe in self.model.moe_layers():
                bias = moe.gate.e_score_correction_bias
                if bias is not None and name in self.counts:
                    c = self.counts[name].to(bias.device)
                    bias.add_(gamma * torch.sign(c.mean() - c))

    def reset(self) -> None:
        self.counts = {}
