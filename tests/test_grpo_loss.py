"""GRPO objective: advantages by hand, each loss aggregation against hand-computed numbers, clipping, KL, metrics."""

import math

import pytest
import torch

from nanoseek.rl import group_advantages, grpo_loss, reflection_share, token_entropy, zero_variance_mask
from nanoseek.rl.grpo_loss import step_advantages

SEED_REWARDS = [1.0, 0.7, 1.0, 0.0]  # the seed text's derivative example (mean 0.675)


# ---------------------------------------------------------------------------------------- advantages

def test_advantages_sample_std_is_the_default():
    # sample std: sqrt(((0.325^2) * 2 + 0.025^2 + 0.675^2) / 3) = sqrt(0.6675 / 3) = 0.47170
    adv = group_advantages(torch.tensor(SEED_REWARDS), group_size=4)
    assert adv.tolist() == pytest.approx([0.689, 0.053, 0.689, -1.431], abs=1e-3)


def test_advantages_population_std():
    # population std: sqrt(0.6675 / 4) = 0.40850
    adv = group_advantages(torch.tensor(SEED_REWARDS), group_size=4, correction=0)
    assert adv.tolist() == pytest.approx([0.796, 0.061, 0.796, -1.652], abs=1e-3)


def test_dr_grpo_advantages_have_no_std():
    adv = group_advantages(torch.tensor(SEED_REWARDS), group_size=4, scale_std=False)
    assert adv.tolist() == pytest.approx([0.325, 0.025, 0.325, -0.675], abs=1e-6)


def test_batch_level_std():
    # groups [1, 0] and [1, 1]; all rewards [1, 0, 1, 1] have mean 0.75 and sample std sqrt(0.75 / 3) = 0.5
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    batch = group_advantages(r, group_size=2, level="batch")
    assert batch.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0], abs=1e-6)
    group = group_advantages(r, group_size=2)  # the group's own std is sqrt(0.5) = 0.7071
    assert group.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4), 0, 0])


@pytest.mark.parametrize("kw", [{}, {"scale_std": False}, {"level": "batch"}, {"correction": 0}])
def test_zero_variance_groups_are_zero_and_masked(kw):
    # float32 mean(0.9, 0.9, 0.9) - 0.9 = 6e-8, which / (0 + 1e-4) would leak 6e-4 advantages without the zeroing
    r = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(r, group_size=3, **kw)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0] and adv[6:].tolist() == [0.0, 0.0, 0.0]
    assert (adv[3:6] != 0).all()
    assert zero_variance_mask(r, 3).tolist() == [True] * 3 + [False] * 3 + [True] * 3


def test_advantage_arguments_are_checked():
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="level"):
        group_advantages(torch.zeros(4), group_size=2, level="token")


# ---------------------------------------------------------------------------------------- the loss

# Two sequences, T = 3; the second is one token shorter (its last position is padding).
# Ratios pi/pi_old: seq 0 = [1.0, 1.5, 0.5] with A = +1; seq 1 = [1.1, 0.7, pad] with A = -2; eps = 0.2.
RATIOS = [[1.0, 1.5, 0.5], [1.1, 0.7, 9.0]]
ADV = [1.0, -2.0]
MASK = [[1, 1, 1], [1, 1, 0]]
# min(r A, clip(r, 0.8, 1.2) A) by hand:
#   seq 0: min(1.0, 1.0) = 1.0; min(1.5, 1.2) = 1.2 (clipped); min(0.5, 0.8) = 0.5   -> losses -1.0, -1.2, -0.5
#   seq 1: min(-2.2, -2.2) = -2.2; min(-1.4, -1.6) = -1.6 (clipped)                  -> losses  2.2,  1.6
SEQ_LOSS = [[-1.0, -1.2, -0.5], [2.2, 1.6]]


def inputs(ref_shift=None):
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5]], dtype=torch.float64)
    logp = (old + torch.tensor(RATIOS, dtype=torch.float64).log()).requires_grad_(True)
    ref = None if ref_shift is None else logp.detach() + torch.tensor(ref_shift, dtype=torch.float64)
    return logp, old, ref, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK)


def test_grpo_sequence_mean_then_batch_mean():
    loss, m = grpo_loss(*inputs(), loss_type="grpo")
    expected = (sum(SEQ_LOSS[0]) / 3 + sum(SEQ_LOSS[1]) / 2) / 2  # (-0.9 + 1.9) / 2 = 0.5
    assert loss.item() == pytest.approx(expected) and expected == pytest.approx(0.5)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 5)   # seq 1, ratio 0.7 < 0.8 with A < 0
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5)  # seq 0, ratio 1.5 > 1.2 with A > 0
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    assert m["ratio_mean"].item() == pytest.approx((1.0 + 1.5 + 0.5 + 1.1 + 0.7) / 5)  # padding ignored
    assert "kl" not in m


def test_dr_grpo_constant_normaliser():
    loss, _ = grpo_loss(*inputs(), loss_type="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx((sum(SEQ_LOSS[0]) + sum(SEQ_LOSS[1])) / (2 * 4))  # 1.1 / 8
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(*inputs(), loss_type="dr_grpo")


def test_dapo_token_mean():
    loss, _ = grpo_loss(*inputs(), loss_type="dapo")
    assert loss.item() == pytest.approx(1.1 / 5)
    loss, _ = grpo_loss(*inputs(), loss_type="dapo", num_tokens=10)  # tokens of a larger accumulated batch
    assert loss.item() == pytest.approx(1.1 / 10)


def test_clip_higher():
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(1.25))
    args = (old, None, torch.ones(1), torch.ones(1, 1))
    assert grpo_loss(logp, *args, eps_high=0.2)[0].item() == pytest.approx(-1.2)
    assert grpo_loss(logp, *args, eps_high=0.28)[0].item() == pytest.approx(-1.25)


def test_clipped_tokens_get_no_gradient():
    logp, old, ref, adv, mask = inputs()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, loss_type="grpo")
    loss.backward()
    g = logp.grad
    assert g[0, 1] == 0 and g[1, 1] == 0  # the two clipped tokens
    assert g[1, 2] == 0                   # padding
    # d loss / d logp = -A * r / |o_i| / B for unclipped tokens
    assert g[0, 0].item() == pytest.approx(-1.0 * 1.0 / 3 / 2)
    assert g[0, 2].item() == pytest.approx(-1.0 * 0.5 / 3 / 2)
    assert g[1, 0].item() == pytest.approx(2.0 * 1.1 / 2 / 2)


def test_token_advantages():
    logp, old, ref, adv, mask = inputs()
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        a = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, max_completion_length=4)[0]
        b = grpo_loss(logp, old, ref, adv[:, None].expand(logp.shape), mask, loss_type=loss_type,
                      max_completion_length=4)[0]
        assert a.item() == pytest.approx(b.item())
    per_token = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # only the first token moves
    logp = logp.detach().requires_grad_()
    grpo_loss(logp, old, ref, per_token, mask, loss_type="grpo")[0].backward()
    assert torch.count_nonzero(logp.grad).item() == 1 and logp.grad[0, 0].item() == pytest.approx(-1.0 / 3 / 2)


def test_step_advantages():
    # group 1: steps [0, 1], [1], [], [1]: mean 0.75, sample std 0.5; group 2 all equal -> zeros
    out = step_advantages([[0.0, 1.0], [1.0], [], [1.0], [1.0], [1.0, 1.0], [], []], group_size=4, eps=0.0)
    assert out[:4] == [pytest.approx([-1.5, 0.5]), pytest.approx([0.5]), [], pytest.approx([0.5])]
    assert out[4:] == [[0.0], [0.0, 0.0], [], []]
    assert step_advantages([[1.0], [], [], []], group_size=4) == [[0.0], [], [], []]  # one step: no spread
    with pytest.raises(ValueError, match="groups"):
        step_advantages([[1.0]] * 3, group_size=2)


def test_k3_kl_in_the_loss():
    # ref - logp = d: k3 = e^d - d - 1; d = ln 2 -> 1 - ln 2 = 0.30685, d = -ln 2 -> ln 2 - 0.5 = 0.19315
    shift = [[0.0, math.log(2), 0.0], [-math.log(2), 0.0, 5.0]]
    k_pos, k_neg = 1 - math.log(2), math.log(2) - 0.5
    loss, m = grpo_loss(*inputs(shift), beta=0.1, loss_type="grpo")
    expected = ((sum(SEQ_LOSS[0]) + 0.1 * k_pos) / 3 + (sum(SEQ_LOSS[1]) + 0.1 * k_neg) / 2) / 2
    assert loss.item() == pytest.approx(expected)
    assert m["kl"].item() == pytest.approx((k_pos + k_neg) / 5)  # = 0.1; the padded 5.0 is ignored
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(*inputs(), beta=0.1)


def test_k3_kl_is_nonnegative_and_zero_at_the_reference():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 16, generator=g) * 3
    ref = torch.randn(64, 16, generator=g) * 3
    args = (torch.zeros(64), torch.ones(64, 16))
    for i in range(64):  # one sequence per call so no negative token could hide in a mean
        for t in range(16):
            _, m = grpo_loss(logp[i:i + 1, t:t + 1], logp[i:i + 1, t:t + 1], ref[i:i + 1, t:t + 1],
                             args[0][:1], args[1][:1, :1], beta=1.0)
            assert m["kl"].item() >= 0
    loss, m = grpo_loss(logp, logp, logp.clone(), *args, beta=1.0)
    assert m["kl"].item() == 0 and loss.item() == 0


def test_loss_arguments_are_checked():
    logp, old, ref, adv, mask = inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(logp, old[:, :2], ref, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, ref, adv[:1], mask)


# ---------------------------------------------------------------------------------------- metrics

def test_entropy_of_uniform_is_log_v():
    V = 7
    logits = torch.zeros(2, 3, V)
    logits[1, 2] = torch.tensor([50.0] + [0.0] * (V - 1))  # near one-hot, but masked out
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert token_entropy(logits, mask).item() == pytest.approx(math.log(V), abs=1e-6)
    assert token_entropy(logits, torch.tensor([[0, 0, 0], [0, 0, 1]])).item() == pytest.approx(0.0, abs=1e-6)


def test_reflection_share():
    texts = ["Wait, let me re-check that.", "So the answer is 5.", "I should VERIFY it", "The waitress came."]
    assert reflection_share(texts, words=("wait", "check", "verify")) == 0.5  # "waitress" is not "wait"
    assert reflection_share(texts[1:2]) == 0.0
    assert reflection_share([]) == 0.0
