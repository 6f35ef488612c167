"""Bucketed sizes for CPU bf16 runs (nanoseek/model/buckets.py): the routed experts' row counts, SFT's padded
lengths and GRPO's scoring batches take few distinct sizes, and padding to them changes no result."""

import pytest
import torch

import nanoseek
from nanoseek.data import IGNORE_INDEX
from nanoseek.model import moe
from nanoseek.model.buckets import bucketed, bucketed_counts, bucketing_pays, length_bucket_limit
from nanoseek.rl.rollout import completion_logprobs, pad_batch
from nanoseek.rl.sft_data import SFTExample, collate_examples


def test_buckets_bound_the_padding_and_the_number_of_sizes():
    sizes = list(range(5000))
    buckets = [bucketed(n) for n in sizes]
    assert buckets[0] == 0 and buckets[1] == 16
    assert all(n <= b <= max(n + 16, n * 1.125) for n, b in zip(sizes, buckets))
    assert len(set(buckets[256:2049])) <= 32                      # about eight sizes per doubling
    assert bucketed_counts(torch.tensor(sizes)).tolist() == buckets
    assert bucketing_pays(torch.bfloat16, "cpu") and not bucketing_pays(torch.float32, "cpu")
    assert [length_bucket_limit(p, "cpu", 512) for p in ("float32", "bf16", "fp8")] == [0, 512, 512]


def test_bf16_experts_run_on_bucketed_row_counts_and_match_the_unpadded_computation(monkeypatch):
    g = torch.Generator().manual_seed(0)
    E, D, I = 8, 64, 32
    w13 = (torch.randn(E, 2 * I, D, generator=g) * 0.1).requires_grad_()
    w2 = (torch.randn(E, D, I, generator=g) * 0.1).requires_grad_()
    counts = torch.tensor([37, 0, 101, 5, 64, 250, 1, 42])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), D, generator=g, dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(x.shape, generator=g, dtype=torch.bfloat16)

    seen = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: seen.append(offs.clone()) or grouped_mm(a, b, offs=offs))
    y = moe.grouped_swiglu(x, offsets, w13, w2)
    y.backward(grad)
    padded = [torch.diff(o.long(), prepend=torch.zeros(1, dtype=torch.long)) for o in seen]
    assert padded and all(p.tolist() == bucketed_counts(counts).tolist() for p in padded)

    got = (y.detach(), x.grad, w13.grad, w2.grad)
    x.grad = w13.grad = w2.grad = None
    y_ref = moe._swiglu(x, offsets, w13.to(torch.bfloat16), w2.to(torch.bfloat16))   # unpadded
    y_ref.backward(grad)
    for a, b in zip(got, (y_ref.detach(), x.grad, w13.grad, w2.grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_sft_batches_pad_to_a_bucket_within_the_limit():
    examples = [SFTExample(tokens=list(range(1, 40)), n_prompt=10), SFTExample(tokens=list(range(1, 300)), n_prompt=5)]
    ids, labels = collate_examples(examples, pad_id=0)
    assert ids.shape[1] == 298
    ids_b, labels_b = collate_examples(examples, pad_id=0, bucket_limit=512)
    assert ids_b.shape[1] == bucketed(298) == 320
    assert torch.equal(ids_b[:, :298], ids) and torch.equal(labels_b[:, :298], labels)
    assert (ids_b[:, 298:] == 0).all() and (labels_b[:, 298:] == IGNORE_INDEX).all()
    assert collate_examples(examples, pad_id=0, bucket_limit=300)[0].shape[1] == 300   # capped at the limit


@pytest.mark.parametrize("limit", [0, 64, 30])
def test_bucketed_scoring_batches_score_the_same(limit):
    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny", vocab_size=128), seed=0).eval()
    prompts = [[1, 5, 9, 17]] * 3 + [[2, 3, 44, 61, 100, 7, 8]] * 3
    completions = [[5, 6], [7, 8, 9, 10, 11], [12], [1] * 17, [3, 4], [9] * 9]
    plain = pad_batch(prompts, completions)
    bucketed_batch = pad_batch(prompts, completions, bucket_limit=limit)
    P, C = bucketed_batch.prompt_ids.shape[1], bucketed_batch.completion_ids.shape[1]
    if limit:   # the longest prompt has 7 tokens, the longest completion 17; completion positions stay < limit
        assert (P, C) == (16, min(32, limit - 7))
    with torch.no_grad():
        a, _ = completion_logprobs(model, plain)
        b, _ = completion_logprobs(model, bucketed_batch)
    n = plain.completion_ids.shape[1]
    assert (bucketed_batch.mask[:, n:] == 0).all()
    torch.testing.assert_close(b[:, :n] * plain.mask, a * plain.mask, rtol=1e-5, atol=1e-5)
