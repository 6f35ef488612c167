"""Expert load balancing for DeepSeekMoE training (V3 report §2.1.2; docs/design/moe.md).

- Auxiliary-loss-free balancing: at every optimizer step, b_i += gamma * sign(mean_load - load_i) on the step's
  token counts, outside autograd. The bias only changes which experts are selected. The counts are the MoE
  layers' `tokens_per_expert` buffers, all-reduced over the process group when there is one, so data-parallel
  replicas apply the same update and stay identical (ExpertLoad, an optimizer step hook).
- Complementary sequence-wise balance loss (eqs. 17-20), alpha tiny (1e-4 in V3), and the classic batch-wise
  auxiliary loss (V2 expert-level loss) for comparisons: both read the gates' outputs of one forward, which a
  RoutingRecorder collects; the model keeps nothing of them.
- MaxVio = (max_i load_i - mean load) / mean load, the report's balance metric.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from ..model import Transformer


class Routing(NamedTuple):
    """One MoE layer's routing in one forward: affinities s (N, E) and the chosen experts (N, K)."""
    layer: str
    scores: torch.Tensor
    idx: torch.Tensor


class RoutingRecorder:
    """Collects every MoE gate's (affinities, chosen experts) in training-mode forwards, in call order (the
    main layers, then the MTP blocks that ran), through forward hooks on the gates."""

    def __init__(self, model: Transformer):
        self.records: list[Routing] = []
        self._hooks = [moe.gate.register_forward_hook(self._hook(name)) for name, moe in model.moe_layers()]

    def _hook(self, name: str):
        def record(gate, inputs, outputs):
            if gate.training:
                _, idx, scores = outputs
                self.records.append(Routing(name, scores, idx))
        return record

    def take(self) -> list[Routing]:
        """The records since the last take (which drops them)."""
        records, self.records = self.records, []
        return records

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def sequence_balance_loss(routing: list[Routing], batch_size: int, alpha: float) -> torch.Tensor:
    """alpha * sum_i f_i P_i per sequence (eqs. 17-20), averaged over sequences and MoE layers."""
    losses = []
    for _, scores, idx in routing:
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


def batch_aux_loss(routing: list[Routing], alpha: float) -> torch.Tensor:
    """The classic expert-level auxiliary loss over the whole batch (V2 report eq. 23 style)."""
    losses = []
    for _, scores, idx in routing:
        N, E = scores.shape
        K = idx.shape[1]
        f = torch.bincount(idx.flatten(), minlength=E).float() * (E / (K * N))
        P = (scores / scores.sum(-1, keepdim=True)).mean(0)
        losses.append((f * P).sum())
    if not losses:
        return torch.zeros(())
    return alpha * torch.stack(losses).mean()


class ExpertLoad:
    """The per-expert token counts of each optimizer step and the aux-loss-free bias update.

    `layers`: (name, MoE) pairs of this rank (`model.moe_layers()`); `group`: the data-parallel process group
    (None: all ranks), the ranks that hold the same layers.

    Registered as a post-step hook of the optimizer: after every step it all-reduces the MoE layers' counters
    (one collective for all layers, only when a process group is initialised), keeps them for the metrics
    (`max_vio`, `loads`), moves the routing biases by gamma_at(step) (0: no update) and zeroes the counters.
    A layer that did not run in the step (an MTP block whose loss is off) has no counts and is left out: it must
    not count as perfectly balanced.
    """

    def __init__(self, layers: list[tuple[str, torch.nn.Module]], gamma_at: Callable[[], float] = lambda: 0.0,
                 group=None):
        self.layers, self.gamma_at, self.group = layers, gamma_at, group
        self.counts: dict[str, torch.Tensor] = {}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_post_hook(lambda *_: self.step())

    @torch.no_grad()
    def step(self) -> None:
        if not self.layers:
            return
        counts = torch.stack([moe.tokens_per_expert for _, moe in self.layers])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, group=self.group)
        self.counts = {name: c.float() for (name, _), c in zip(self.layers, counts) if c.sum() > 0}
        gamma = self.gamma_at()
        for name, moe in self.layers:
            bias = moe.gate.e_score_correction_bias
            if gamma > 0 and bias is not None and name in self.counts:
                c = self.counts[name].to(bias.device)
                bias.add_(gamma * torch.sign(c.mean() - c))
        self.reset()

    def reset(self) -> None:
        """Zero the counters (a step whose gradients were dropped must not count)."""
        for _, moe in self.layers:
            moe.tokens_per_expert.zero_()

    def max_vio(self) -> dict[str, float]:
        out = {}
        for name, c in self.counts.items():
            mean = c.mean()
            out[name] = float((c.max() - mean) / mean) if mean > 0 else 0.0
        return out

    def loads(self) -> dict[str, list[float]]:
        """Fraction of routed tokens per expert, per layer (for the heatmap)."""
        return {name: (c / c.sum().clamp(min=1)).tolist() for name, c in self.counts.items()}
