"""DeepSeekMoE (V3 report §2.1.2, eqs. 12-16; v3_spec.md §4): shared experts plus fine-grained routed
experts with sigmoid/softmax affinities and group-limited top-k.

Choices:
- The correction bias (aux-loss-free balancing) enters the *selection* only; gating weights use the
  unbiased affinities (eq. 16). It is a buffer, updated by the trainer outside autograd.
- Dropped groups are masked with -inf, as DeepSeek's official code does (HF fills 0.0, which differs
  when biases are negative; v3_spec.md §4.2).
- Routed experts run as two grouped matmuls over tokens sorted by expert (`torch._grouped_mm`), never a
  Python loop over experts. Each forward records the per-expert token counts (`tokens_per_expert`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate x) * up x). The dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: affinities s = sigmoid|softmax(u W^T), group-limited top-k, normalized and scaled weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        # The bias is a tiny fp32 accumulator of +-gamma steps: keep it fp32 whatever the model dtype.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved is not None and moved.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=moved.device)  # from the fp32 original: no rounding
        return self

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns gating weights (N, K) in fp32, expert indices (N, K) and the affinities s (N, E)."""
        cfg = self.cfg
        logits = F.linear(x_ND.float(), self.weight.float())  # router in fp32, as HF and V3.2
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            grouped = choice.view(x_ND.shape[0], cfg.n_group, -1)
            if cfg.topk_method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(-1)   # sum of the top-2 per group
            else:
                group_score = grouped.amax(-1)                          # V2: best expert per group
            keep = group_score.topk(cfg.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        idx_NK = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        w_NK = scores.gather(1, idx_NK)
        if cfg.norm_topk_prob:
            w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
        return w_NK * cfg.routed_scaling_factor, idx_NK, scores


class Experts(nn.Module):
    """All routed experts as stacked weights: gate_up_proj (E, 2I, D) and down_proj (E, D, I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor,
                counts_E: torch.Tensor) -> torch.Tensor:
        N, K = idx_NK.shape
        w13, w2 = self.gate_up_proj, self.down_proj
        if not torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # A few tokens gather their experts' weights, which inductor fuses into the step; more tokens
                # run the eager kernels as one opaque op (inductor has no fp32 grouped_mm on CPU). Gathering
                # reads N*K experts' weights, the grouped path each hit expert once plus a per-expert
                # overhead: the crossover measured on the small preset lies between 64 and 128 pairs (4E, 8E).
                if N * K <= 4 * w13.shape[0]:
                    return _gathered(x_ND, w_NK, idx_NK, w13, w2)
                return torch.ops.nanoseek.routed_experts(x_ND, w_NK, idx_NK, w13, w2)
            if N == 1 and not x_ND.is_cuda:   # batch-1 decode
                return _one_token(x_ND, w_NK, idx_NK, w13, w2)
        return _grouped(x_ND, w_NK, idx_NK, counts_E, w13, w2)


def _grouped(x_ND, w_NK, idx_NK, counts_E, w13, w2) -> torch.Tensor:
    """Token-expert pairs sorted by expert, two grouped matmuls, outputs added back per token."""
    N, K = idx_NK.shape
    order = idx_NK.flatten().argsort(stable=True)            # token-expert pairs grouped by expert
    token_S = order // K
    offsets = counts_E.cumsum(0).to(torch.int32)
    dtype = x_ND.dtype
    # grouped_mm is not autocast-aware. On CUDA, follow autocast (bf16 GEMMs are the fast path); on
    # CPU keep the weights' dtype: without AMX, bf16 GEMMs run at about half the fp32 rate
    # (190 vs 386 GFLOP/s measured by benchmarks/bench_matmul_peak.py on the 2-core dev machine).
    if torch.is_autocast_enabled(x_ND.device.type):
        dtype = torch.get_autocast_dtype(x_ND.device.type) if x_ND.is_cuda else w2.dtype
    w13, w2 = w13.to(dtype), w2.to(dtype)
    # index_select/index_add (not x[idx] / scatter): their backward passes are a plain index_add/gather.
    x_SD = x_ND.to(dtype).index_select(0, token_S)
    gate, up = torch._grouped_mm(x_SD, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    y_SD = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)
    y_SD = y_SD * w_NK.flatten()[order].to(dtype)[:, None]   # g_{i,t} * FFN_i(u_t)
    return torch.zeros(N, y_SD.shape[1], dtype=dtype, device=x_ND.device).index_add_(0, token_S, y_SD)


def _one_token(x_1D, w_1K, idx_1K, w13, w2) -> torch.Tensor:
    """Batch-1 decode on CPU: the K hit experts one by one, on views of their weights. grouped_mm would
    visit all E experts (an mm, slices and a host sync each) and gathering K weight copies for one bmm
    costs more than it saves. The gating weight rides on addmm's alpha: every op here is overhead."""
    y_1D = None
    for e, g in zip(idx_1K[0].tolist(), w_1K[0].tolist()):
        gate, up = F.linear(x_1D, w13[e]).chunk(2, dim=-1)
        h_1I, w2_ID = F.silu(gate) * up, w2[e].t()
        y_1D = torch.mm(h_1I, w2_ID).mul_(g) if y_1D is None else torch.addmm(y_1D, h_1I, w2_ID, alpha=g)
    return y_1D


def _gathered(x_ND, w_NK, idx_NK, w13, w2) -> torch.Tensor:
    """Compiled decode of a few tokens: the weights of every token-expert pair gathered and applied as two
    bmm. No shape depends on the routing (no per-expert counts, no host sync), so inductor fuses it."""
    N, K = idx_NK.shape
    e_S = idx_NK.flatten()
    x_S1D = x_ND[:, None].expand(N, K, x_ND.shape[-1]).reshape(N * K, 1, -1)
    gate, up = torch.bmm(x_S1D, w13[e_S].transpose(1, 2)).chunk(2, dim=-1)
    y_S1D = torch.bmm(F.silu(gate) * up, w2[e_S].transpose(1, 2))
    return (y_S1D.view(N, K, -1) * w_NK[..., None].to(y_S1D.dtype)).sum(1)


@torch.library.custom_op("nanoseek::routed_experts", mutates_args=())
def routed_experts(x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor) -> torch.Tensor:
    """The routed experts' inference forward as one op that torch.compile calls but does not trace."""
    if idx_NK.shape[0] == 1 and not x_ND.is_cuda:
        return _one_token(x_ND, w_NK, idx_NK, w13, w2)
    counts_E = torch.bincount(idx_NK.flatten(), minlength=w13.shape[0])
    return _grouped(x_ND, w_NK, idx_NK, counts_E, w13, w2)


@routed_experts.register_fake
def _(x_ND, w_NK, idx_NK, w13, w2):
    return x_ND.new_empty(x_ND.shape[0], w2.shape[1])


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts > 0 else None)
        # Token counts per expert of the last forward (balancing, MaxVio); not a parameter.
        self.tokens_per_expert = torch.zeros(cfg.n_routed_experts, dtype=torch.long)
        self.routing = None  # (scores, topk indices) of the last training forward, for balance losses

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        w_NK, idx_NK, scores = self.gate(x_ND)
        # scatter_add, not bincount: bincount's output size depends on the data, which breaks a compiled graph
        idx_S = idx_NK.flatten()
        counts = idx_S.new_zeros(self.n_experts).scatter_add_(0, idx_S, torch.ones_like(idx_S))
        self.tokens_per_expert = counts.detach()
        self.routing = (scores, idx_NK) if self.training else None
        y = self.experts(x_ND, w_NK, idx_NK, counts).view_as(x_BTD).to(x_BTD.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_BTD)
        return y
