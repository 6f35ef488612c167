"""linear_cross_entropy: the chunked, fused loss equals the plain `F.cross_entropy(head(h).float(), labels)`."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanoseek.train.loss as loss_mod
from nanoseek.train.loss import linear_cross_entropy

N, D, V = 300, 32, 96   # 300 rows: the last chunk is partial


def _case(seed=0, ignore_every=7):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 0.3)
    h = torch.randn(N, D, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return head, h, labels


def _loss_and_grads(head, h, labels, fused: bool, monkeypatch, bf16=True):
    monkeypatch.setattr(loss_mod, "FUSED_MIN_VALUES", 0 if fused else 1 << 62)
    monkeypatch.setattr(loss_mod, "CHUNK_VALUES", 64 * V)   # 64-row chunks
    head.weight.grad = None
    h = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = linear_cross_entropy(h, head, labels)
    (loss * 2.0).backward()   # an upstream gradient other than 1
    return loss.detach(), h.grad, head.weight.grad


@pytest.mark.parametrize("ignore_every", [0, 7])
def test_fused_matches_plain_under_bf16_autocast(monkeypatch, ignore_every):
    head, h, labels = _case(ignore_every=ignore_every)
    plain = _loss_and_grads(head, h, labels, False, monkeypatch)
    fused = _loss_and_grads(head, h, labels, True, monkeypatch)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    for f, p in zip(fused[1:], plain[1:]):
        assert f.dtype == p.dtype == torch.float32
        # both round the logits' gradient to bf16 before the backward GEMMs; they differ by that rounding
        assert (f - p).norm() / p.norm() < 2e-2
    # and both are the fp32 reference's up to bf16 rounding
    ref = _loss_and_grads(head, h, labels, False, monkeypatch, bf16=False)
    torch.testing.assert_close(fused[0], ref[0], rtol=2e-2, atol=2e-2)
    assert (fused[1] - ref[1]).norm() / ref[1].norm() < 3e-2


def test_plain_code_where_fusing_does_not_apply(monkeypatch):
    head, h, labels = _case()
    monkeypatch.setattr(loss_mod, "FUSED_MIN_VALUES", 0)
    expected = F.cross_entropy(head(h).float(), labels)
    assert torch.equal(linear_cross_entropy(h, head, labels), expected)   # fp32: no casts to save
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # no backward to prepare
        assert torch.equal(linear_cross_entropy(h, head, labels),
                           F.cross_entropy(head(h).float(), labels))


def test_every_label_ignored_gives_nan_like_cross_entropy(monkeypatch):
    head, h, labels = _case()
    loss = _loss_and_grads(head, h, torch.full_like(labels, -100), True, monkeypatch)[0]
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(head(h), torch.full_like(labels, -100)))


def test_training_losses_fused_equal_plain(monkeypatch):
    """language_model_losses (main head and MTP depth, with its shifted labels) through the fused loss."""
    import nanoseek
    from nanoseek.train import language_model_losses

    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny", num_nextn_predict_layers=1), seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=g)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :5] = -100
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(loss_mod, "FUSED_MIN_VALUES", 0 if fused else 1 << 62)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lm, mtp = language_model_losses(model, x, y)
        (lm + 0.3 * mtp[0]).backward()
        results[fused] = (lm.detach(), mtp[0].detach(), model.lm_head.weight.grad.clone(),
                          model.model.embed_tokens.weight.grad.clone())
    for f, p in zip(results[True][:2], results[False][:2]):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-4)
    for f, p in zip(results[True][2:], results[False][2:]):
        assert (f - p).norm() / p.norm() < 2e-2
