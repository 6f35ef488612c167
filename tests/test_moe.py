"""DeepSeekMoE: grouped-matmul experts vs a per-expert loop, and the router against a plain reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig
from nanoseek.model.moe import Experts, Gate, MoE, combine, dispatch


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **overrides)


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def _identity_gate(cfg: ModelConfig) -> Gate:
    """A gate whose router logits equal its input (hidden_size == n_routed_experts, weight = I)."""
    assert cfg.hidden_size == cfg.n_routed_experts
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(cfg.n_routed_experts))
    return gate


# ---- experts ------------------------------------------------------------------------------------

def _experts_reference(x, w, idx, gate_up, down):
    """sum_k w[n, k] * down_e(silu(gate_e x) * up_e x), one token and one expert at a time."""
    out = []
    for n in range(x.shape[0]):
        acc = torch.zeros_like(x[n])
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            g, u = (gate_up[e] @ x[n]).chunk(2)
            acc = acc + w[n, k] * (down[e] @ (F.silu(g) * u))
        out.append(acc)
    return torch.stack(out)


def _moe_with_random_experts(cfg: ModelConfig, seed: int) -> MoE:
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.experts.gate_up_proj.copy_(0.3 * torch.randn(moe.experts.gate_up_proj.shape, generator=g))
        moe.experts.down_proj.copy_(0.3 * torch.randn(moe.experts.down_proj.shape, generator=g))
    return moe


def test_dispatch_experts_combine_equal_a_per_expert_loop_forward_and_backward(assert_rel_close):
    cfg = _cfg(hidden_size=24, moe_intermediate_size=16, n_routed_experts=6, n_group=3, topk_group=2,
               num_experts_per_tok=2)
    experts = _moe_with_random_experts(cfg, 0).experts
    g = torch.Generator().manual_seed(0)
    N, K = 21, 2
    # distinct experts per token, drawn from 0..4 only: expert 5 receives no token (an empty group)
    idx = torch.stack([torch.randperm(5, generator=g)[:K] for _ in range(N)])
    counts = torch.bincount(idx.flatten(), minlength=6)
    assert counts[5] == 0 and (counts[:5] > 0).all()
    x = torch.randn(N, 24, generator=g, requires_grad=True)
    w = torch.rand(N, K, generator=g).requires_grad_()
    probe = torch.randn(N, 24, generator=g)

    x_SD, order, token = dispatch(x, idx, x.dtype)
    assert torch.equal(idx.flatten()[order], idx.flatten().sort(stable=True).values)   # rows grouped by expert
    assert torch.equal(x_SD, x.detach()[token])
    y = combine(experts(x_SD, counts), w, order, token)
    (y * probe).sum().backward()
    grads = [t.grad.clone() for t in (x, w, experts.gate_up_proj, experts.down_proj)]

    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gu_ref = experts.gate_up_proj.detach().clone().requires_grad_()
    down_ref = experts.down_proj.detach().clone().requires_grad_()
    y_ref = _experts_reference(x_ref, w_ref, idx, gu_ref, down_ref)
    (y_ref * probe).sum().backward()

    assert_rel_close(y, y_ref, 1e-5, "expert output")
    for name, got, want in zip(("x", "w", "gate_up_proj", "down_proj"), grads,
                               (x_ref.grad, w_ref.grad, gu_ref.grad, down_ref.grad)):
        assert_rel_close(got, want, 1e-5, f"gradient w.r.t. {name}")
    assert grads[2][5].abs().sum() == 0 and grads[3][5].abs().sum() == 0


def test_one_token_path_equals_the_grouped_path():
    """Batch-1 decode without autograd runs the hit experts one by one (`MoE.routed` picks `_one_token`); it must
    give the grouped path's values (grouped: the same token with grad mode on, or as row 0 of a 2-token batch)."""
    cfg = _cfg(hidden_size=24, moe_intermediate_size=16, n_routed_experts=6, n_group=3, topk_group=2,
               num_experts_per_tok=3)
    moe = _moe_with_random_experts(cfg, 4)
    g = torch.Generator().manual_seed(4)
    idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(2)])
    x, w = torch.randn(2, 24, generator=g), torch.rand(2, 3, generator=g)

    def run(n):
        return moe.routed(x[:n], w[:n], idx[:n], torch.bincount(idx[:n].flatten(), minlength=6))[0]

    grouped_1 = run(1)                       # grad mode on: the grouped path (autograd-safe)
    with torch.no_grad():
        one, grouped_2 = run(1), run(2)
    experts = moe.experts
    ref = _experts_reference(x[:1], w[:1], idx[:1], experts.gate_up_proj.detach(), experts.down_proj.detach())[0]
    assert grouped_1.requires_grad and not one.requires_grad
    for name, want in (("grouped, 1 token", grouped_1), ("grouped, 2 tokens", grouped_2), ("reference", ref)):
        torch.testing.assert_close(one, want.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"one-token vs {name}: {m}")


def test_a_replaced_experts_module_is_used_for_inference_too():
    """Inference fast paths read the plain Experts' weights; a replacement (FP8, expert parallel) must see every
    token instead, also for batch-1 decode."""
    cfg = _cfg(hidden_size=24, moe_intermediate_size=16, n_routed_experts=6, n_group=3, topk_group=2,
               num_experts_per_tok=3)
    moe = _moe_with_random_experts(cfg, 5)

    class Doubled(Experts):
        def forward(self, x_SD, counts_E):
            return 2 * super().forward(x_SD, counts_E)

    x, w, idx = torch.randn(1, 24), torch.rand(1, 3), torch.tensor([[0, 2, 5]])
    counts = torch.bincount(idx.flatten(), minlength=6)
    with torch.no_grad():
        plain = moe.routed(x, w, idx, counts)
        doubled = Doubled(cfg)
        doubled.load_state_dict(moe.experts.state_dict())
        moe.experts = doubled
        torch.testing.assert_close(moe.routed(x, w, idx, counts), 2 * plain)


def test_grouped_experts_in_bf16_stay_close_to_the_fp32_loop(rel_err):
    cfg = _cfg(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8)
    moe = _moe_with_random_experts(cfg, 1)
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(30)])
    x, w = torch.randn(30, 32, generator=g), torch.rand(30, 2, generator=g)
    ref = _experts_reference(x, w, idx, moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach())
    bf16 = copy.deepcopy(moe).to(torch.bfloat16)
    with torch.no_grad():
        y = bf16.routed(x.bfloat16(), w, idx, torch.bincount(idx.flatten(), minlength=8))
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref) < 3e-2


def test_moe_output_is_shared_plus_weighted_routed_experts(assert_rel_close):
    cfg = _cfg(n_shared_experts=2)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        moe.gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg.n_routed_experts, generator=g))
    x = torch.randn(2, 9, cfg.hidden_size, generator=g)
    with torch.no_grad():
        y = moe(x)
        w, idx, _ = moe.gate(x.reshape(-1, cfg.hidden_size))
        routed = _experts_reference(x.reshape(-1, cfg.hidden_size), w, idx, moe.experts.gate_up_proj,
                                    moe.experts.down_proj)
        expected = routed.view_as(x) + moe.shared_experts(x)
    assert moe.shared_experts.gate_proj.weight.shape[0] == 2 * cfg.moe_intermediate_size
    assert_rel_close(y, expected, 1e-5, "MoE output")


def test_tokens_per_expert_counts_every_routed_pair_of_training_forwards():
    cfg = _cfg()
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(3, 11, cfg.hidden_size, generator=g)
    with torch.no_grad():
        moe.eval()(x)
        assert int(moe.tokens_per_expert.sum()) == 0, "inference forwards do not count"
        moe.train()(x)
        moe(x[:1])
        _, idx, _ = moe.gate(x.reshape(-1, cfg.hidden_size))
    N, K = 33, cfg.num_experts_per_tok
    assert idx.shape == (N, K)
    assert all(len(set(row.tolist())) == K for row in idx), "an expert was chosen twice for one token"
    counts = moe.tokens_per_expert
    expected = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts) + \
        torch.bincount(idx[:11].flatten(), minlength=cfg.n_routed_experts)
    assert counts.shape == (cfg.n_routed_experts,) and int(counts.sum()) == (N + 11) * K
    assert torch.equal(counts, expected), "counts add up over forwards until the training run reads them"
    assert "tokens_per_expert" not in moe.state_dict()


def test_routing_bias_stays_fp32_when_the_model_is_cast(tiny_model):
    """The bias is an fp32 accumulator of small +-gamma steps: casting the model must keep its dtype *and* its
    values (a round trip through bf16 would erase steps below bf16's resolution)."""
    model = copy.deepcopy(tiny_model)
    before = {}
    for name, moe in model.moe_layers():
        bias = 0.1 + 1e-4 * torch.arange(moe.n_experts, dtype=torch.float32)  # not representable in bf16
        moe.gate.e_score_correction_bias.copy_(bias)
        before[name] = bias
    model.to(torch.bfloat16)
    for name, moe in model.moe_layers():
        assert moe.gate.weight.dtype == torch.bfloat16
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
        got = moe.gate.e_score_correction_bias
        assert torch.equal(got, before[name]), f"{name}: bias values changed by the cast: {got} vs {before[name]}"
    assert all(t.dtype == torch.float32 for n, t in model.state_dict().items() if n.endswith("correction_bias"))
    model.half()
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for _, m in model.moe_layers())
    with torch.no_grad():
        out = model.to(torch.bfloat16)(torch.randint(0, model.cfg.vocab_size, (1, 8)))
    assert torch.isfinite(out).all()


# ---- routing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("grouped", [False, True])
def test_bias_selects_experts_but_does_not_weight_them(grouped):
    cfg = _cfg(hidden_size=8, n_routed_experts=8, num_experts_per_tok=2, scoring_func="sigmoid",
               topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
               n_group=4 if grouped else 1, topk_group=2 if grouped else 1)
    gate = _identity_gate(cfg)
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.05])
    x = _logit(s)[None]
    w, idx, scores = gate(x)
    assert set(idx[0].tolist()) == {0, 1}, "without a bias the two best experts are chosen"
    with torch.no_grad():
        gate.e_score_correction_bias[7] = 5.0  # the weakest expert becomes the most attractive
    w, idx, scores = gate(x)
    torch.testing.assert_close(scores[0], s, rtol=1e-6, atol=1e-7)  # affinities are unbiased
    chosen = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert set(chosen) == {7, 0}
    assert chosen[7] == pytest.approx(0.05 / (0.05 + 0.9) * 2.5, rel=1e-5)
    assert chosen[0] == pytest.approx(0.9 / (0.05 + 0.9) * 2.5, rel=1e-5)
    assert w.dtype == torch.float32


def test_dropped_groups_are_never_chosen():
    """Kept groups hold only negative biased scores, a dropped group holds the best single expert: with the
    official -inf masking no expert of a dropped group may be chosen (a 0.0 fill would pick them)."""
    cfg = _cfg(hidden_size=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
               scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.0)
    gate = _identity_gate(cfg)
    biased = torch.tensor([-1.0, -1.1,  # group 0: top-2 sum -2.1 (kept)
                           -1.2, -1.3,  # group 1: -2.5 (kept)
                           0.5, -4.0,   # group 2: -3.5 (dropped) although expert 4 is the best expert
                           -3.0, -3.0])  # group 3: -6.0 (dropped)
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(biased - 0.5)
    w, idx, scores = gate(torch.zeros(1, 8))  # every affinity is sigmoid(0) = 0.5
    assert sorted(idx[0].tolist()) == [0, 1, 2]
    torch.testing.assert_close(w, torch.full((1, 3), 1 / 3))


def test_group_score_is_top2_sum_for_noaux_tc_and_max_for_group_limited_greedy():
    probs = torch.tensor([0.95, 0.2, 0.1, 0.05, 0.7, 0.7, 0.1, 0.1])
    # group 0 has the best expert (max), group 1 the best pair (top-2 sum)
    common = dict(hidden_size=8, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                  norm_topk_prob=False, routed_scaling_factor=1.0)
    v3 = _identity_gate(_cfg(scoring_func="sigmoid", topk_method="noaux_tc", **common))
    _, idx, _ = v3(_logit(probs)[None])
    assert sorted(idx[0].tolist()) == [4, 5]
    v2 = _identity_gate(_cfg(scoring_func="softmax", topk_method="group_limited_greedy", **common))
    w, idx, scores = v2(torch.log(probs)[None])
    assert sorted(idx[0].tolist()) == [0, 1]
    torch.testing.assert_close(scores[0], probs / probs.sum())
    torch.testing.assert_close(w[0].sort().values, (probs[[1, 0]] / probs.sum()))  # not renormalized


def _reference_routing(x, weight, bias, cfg):
    """Per token, in float64: affinities, group filter, top-k on biased scores, unbiased weights."""
    logits = x.double() @ weight.double().T
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    E, G, K = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    per = E // G
    result = []
    for n in range(x.shape[0]):
        s = scores[n].tolist()
        choice = [s[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        allowed = list(range(E))
        if cfg.topk_method != "greedy" and G > 1:
            groups = [choice[g * per:(g + 1) * per] for g in range(G)]
            if cfg.topk_method == "noaux_tc":
                group_score = [sum(sorted(gr, reverse=True)[:2]) for gr in groups]
            else:
                group_score = [max(gr) for gr in groups]
            kept = sorted(range(G), key=lambda g: -group_score[g])[:cfg.topk_group]
            allowed = [e for e in allowed if e // per in kept]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:K]
        weights = [s[e] for e in chosen]
        if cfg.norm_topk_prob:
            total = sum(weights)
            weights = [v / total for v in weights]
        result.append({e: v * cfg.routed_scaling_factor for e, v in zip(chosen, weights)})
    return scores, result


@pytest.mark.parametrize("overrides", [
    dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, num_experts_per_tok=4,
         norm_topk_prob=True, routed_scaling_factor=2.5),
    dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1, num_experts_per_tok=3,
         norm_topk_prob=True, routed_scaling_factor=2.5),
    dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=6,
         norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(scoring_func="softmax", topk_method="greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
         norm_topk_prob=True, routed_scaling_factor=16.0),
    dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=3,
         num_experts_per_tok=6, norm_topk_prob=False, routed_scaling_factor=16.0),
    dict(scoring_func="sigmoid", topk_method="group_limited_greedy", n_group=8, topk_group=1,
         num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=1.0),
], ids=["v3-noaux_tc-grouped", "noaux_tc-ungrouped", "v2lite-softmax-greedy", "softmax-greedy-ignores-groups",
        "v2-group_limited_greedy", "sigmoid-group_limited_greedy"])
def test_gate_matches_reference_routing(overrides):
    cfg = _cfg(hidden_size=32, n_routed_experts=16, **overrides)
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        gate.weight.copy_(0.4 * torch.randn(gate.weight.shape, generator=g))
    bias = None
    if cfg.topk_method == "noaux_tc":
        bias = 0.3 * torch.randn(16, generator=g)
        with torch.no_grad():
            gate.e_score_correction_bias.copy_(bias)
    else:
        assert gate.e_score_correction_bias is None
    x = torch.randn(64, 32, generator=g)
    w, idx, scores = gate(x)
    ref_scores, ref = _reference_routing(x, gate.weight.detach(), bias, cfg)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-6)
    differs_from_plain_topk = 0
    for n in range(64):
        got = dict(zip(idx[n].tolist(), w[n].tolist()))
        assert set(got) == set(ref[n]), f"token {n}: chose {sorted(got)}, reference {sorted(ref[n])}"
        for e, v in ref[n].items():
            assert got[e] == pytest.approx(v, rel=1e-5, abs=1e-7), f"token {n}, expert {e}"
        plain = set(scores[n].topk(cfg.num_experts_per_tok).indices.tolist())
        differs_from_plain_topk += plain != set(got)
    if cfg.topk_method == "noaux_tc" or (cfg.topk_method == "group_limited_greedy" and cfg.n_group > 1):
        assert differs_from_plain_topk > 0, "the case never exercises the bias or the group filter"


def test_router_gradient_reaches_the_gate_weight_but_not_the_bias():
    cfg = _cfg()
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.normal_(0, 0.3)
        gate.e_score_correction_bias.normal_(0, 0.1)
    w, _, _ = gate(torch.randn(10, cfg.hidden_size))
    (w * torch.randn_like(w)).sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert not gate.e_score_correction_bias.requires_grad
    assert "e_score_correction_bias" not in dict(gate.named_parameters())
    assert "e_score_correction_bias" in gate.state_dict()
