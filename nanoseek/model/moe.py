"""DeepSeekMoE (V3 report §2.1.2, eqs. 12-16; docs/design/moe.md): shared experts plus fine-grained routed
experts with sigmoid/softmax affinities and group-limited top-k.

Choices:
- The correction bias (aux-loss-free balancing) enters the *selection* only; gating weights use the
  unbiased affinities (eq. 16). It is a buffer, updated by the training run outside autograd.
- Dropped groups are masked with -inf, as DeepSeek's official code does (HF fills 0.0, which differs
  when biases are negative; docs/design/moe.md).
- Routed experts: dispatch (token-expert pairs sorted by expert) -> `Experts` (two grouped matmuls,
  `torch._grouped_mm`, never a Python loop over experts) -> combine (weighted, added back per token).
  `Experts` is the seam expert parallelism and low-precision GEMMs replace; `MoE.routed` is the one place
  an inference fast path may be taken instead.
- Training forwards add their per-expert token counts to the `tokens_per_expert` buffer; the model stores
  nothing else about routing (balance losses read the gates' outputs through nanoseek.train.balance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .buckets import bucketed_counts, bucketing_pays


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
    """All routed experts as stacked weights, gate_up_proj (E, 2I, D) and down_proj (E, D, I), and their compute:
    SwiGLU over token rows already grouped by expert, as two grouped matmuls.

    `forward(x_SD, counts_E)` is the seam between routing and compute: MoE dispatches the tokens before it and
    combines the outputs after it, so expert parallelism (tokens exchanged around this module) and another
    GEMM (FP8, another kernel) replace or wrap this module alone.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_SD: token rows sorted by expert, counts_E[e] of them for expert e; returns FFN_e(x) per row."""
        return grouped_swiglu(x_SD, counts_E.cumsum(0).to(torch.int32), self.gate_up_proj, self.down_proj)


def expert_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the routed experts' GEMMs: grouped_mm is not autocast-aware, so follow autocast by hand (the
    experts are most of the FLOPs; whether bf16 pays on a CPU is the precision choice's job, nanoseek/machine.py),
    else the activations' dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# Outside torch.compile's graphs (nanoseek train --compile): grouped_mm's shape function accepts only bf16 on CPU,
# and the per-expert row counts follow the routing; the graphs around it still fuse.
@torch.compiler.disable
def grouped_swiglu(x_SD, offsets_E, w13, w2) -> torch.Tensor:
    """down_e(silu(gate_e x) * up_e x) for rows grouped by expert (offsets_E: each group's end row)."""
    w13, w2 = w13.to(x_SD.dtype), w2.to(x_SD.dtype)
    if bucketing_pays(x_SD.dtype, x_SD.device) and x_SD.shape[0]:
        return _bucketed_swiglu(x_SD, offsets_E, w13, w2)
    return _swiglu(x_SD, offsets_E, w13, w2)


def _swiglu(x_SD, offsets_E, w13, w2) -> torch.Tensor:
    gate, up = torch._grouped_mm(x_SD, w13.transpose(1, 2), offs=offsets_E).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets_E)


def _bucketed_swiglu(x_SD, offsets_E, w13, w2) -> torch.Tensor:
    """grouped_swiglu with each expert's rows padded with zero rows to a bucketed count (nanoseek/model/buckets.py):
    the routing gives every expert a new row count at every step, and without buckets the kernel builds made bf16
    training steps 2.5x slower than fp32 on a CPU whose bf16 GEMMs are 4x faster. The padded rows are dropped."""
    counts_E = torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1, dtype=torch.long))
    padded_E = bucketed_counts(counts_E)
    shift_E = (padded_E.cumsum(0) - padded_E) - (offsets_E.long() - counts_E)   # padded start - start
    rows_S = torch.arange(x_SD.shape[0], device=x_SD.device) + shift_E.repeat_interleave(counts_E)
    x_PD = x_SD.new_zeros(int(padded_E.sum()), x_SD.shape[1]).index_copy(0, rows_S, x_SD)
    return _swiglu(x_PD, padded_E.cumsum(0).to(torch.int32), w13, w2).index_select(0, rows_S)


def dispatch(x_ND: torch.Tensor, idx_NK: torch.Tensor, dtype: torch.dtype):
    """Token-expert pairs sorted by expert: the rows x_SD (S = N*K) and what `combine` needs to undo the sort."""
    order_S = idx_NK.flatten().argsort(stable=True)
    token_S = order_S // idx_NK.shape[1]
    # index_select/index_add (not x[idx] / scatter): their backward passes are a plain index_add/gather.
    return x_ND.to(dtype).index_select(0, token_S), order_S, token_S


def combine(y_SD: torch.Tensor, w_NK: torch.Tensor, order_S: torch.Tensor, token_S: torch.Tensor) -> torch.Tensor:
    """sum_k g_{t,k} FFN_k(u_t) per token (V3 report eq. 12): the expert outputs weighted and added back."""
    y_SD = y_SD * w_NK.flatten()[order_S].to(y_SD.dtype)[:, None]
    return torch.zeros(w_NK.shape[0], y_SD.shape[1], dtype=y_SD.dtype, device=y_SD.device).index_add_(0, token_S, y_SD)


def _grouped(x_ND, w_NK, idx_NK, counts_E, w13, w2) -> torch.Tensor:
    """dispatch -> grouped_swiglu -> combine on explicit weights (the compiled decode's opaque op)."""
    x_SD, order_S, token_S = dispatch(x_ND, idx_NK, expert_dtype(x_ND))
    return combine(grouped_swiglu(x_SD, counts_E.cumsum(0).to(torch.int32), w13, w2), w_NK, order_S, token_S)


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
    """Shared experts plus routed experts: gate -> dispatch -> experts -> combine (+ shared)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts > 0 else None)
        # Routed token-expert pairs per expert, summed over the training forwards since the last optimizer
        # step; the training run all-reduces, reads and zeroes them (nanoseek/train/balance.py). Not saved.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.long),
                             persistent=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        w_NK, idx_NK, _ = self.gate(x_ND)
        # scatter_add, not bincount: bincount's output size depends on the data, which breaks a compiled graph
        idx_S = idx_NK.flatten()
        counts_E = idx_S.new_zeros(self.n_experts).scatter_add_(0, idx_S, torch.ones_like(idx_S))
        if self.training:
            self.tokens_per_expert += counts_E
        y = self.routed(x_ND, w_NK, idx_NK, counts_E).view_as(x_BTD).to(x_BTD.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_BTD)
        return y

    def routed(self, x_ND, w_NK, idx_NK, counts_E) -> torch.Tensor:
        """The routed experts' output per token. The one place a path is chosen:

        | when                                              | path                                     |
        |---------------------------------------------------|------------------------------------------|
        | autograd on, or `experts` replaced (FP8, EP)      | dispatch -> experts -> combine           |
        | no autograd, eager, one token on CPU (decode)     | `_one_token`: K expert views, no sort    |
        | no autograd, compiled, N*K <= 4E token-expert pairs | `_gathered`: weights gathered, fusable |
        | no autograd, compiled, more pairs                 | `routed_experts`: an opaque custom op    |
        | no autograd otherwise                             | dispatch -> experts -> combine           |

        The inference paths read the plain Experts' weights, so a replaced `experts` module turns them off. Under
        compile, gathering reads N*K experts' weights and grouping each hit expert once plus a per-expert
        overhead, so gathering wins for a few tokens only (the 4E threshold was tuned on the small preset with
        benchmarks/bench_decode.py); inductor has no fp32 grouped_mm on CPU, hence the opaque op.
        """
        if not torch.is_grad_enabled() and type(self.experts) is Experts:
            w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
            if torch.compiler.is_compiling():
                if idx_NK.numel() <= 4 * self.n_experts:
                    return _gathered(x_ND, w_NK, idx_NK, w13, w2)
                return torch.ops.nanoseek.routed_experts(x_ND, w_NK, idx_NK, w13, w2)
            if x_ND.shape[0] == 1 and not x_ND.is_cuda:
                return _one_token(x_ND, w_NK, idx_NK, w13, w2)
        x_SD, order_S, token_S = dispatch(x_ND, idx_NK, expert_dtype(x_ND))
        return combine(self.experts(x_SD, counts_E), w_NK, order_S, token_S)
