"""SamplingParams validation, the logits processors on hand-made logits, and sampling through the engine:
greedy limits of top-k/top-p/min-p, penalties, seeds that do not depend on the batch."""

from __future__ import annotations

import math

import pytest
import torch

import nanoseek
from nanoseek import ModelConfig
from nanoseek.infer import LLM, SamplingParams, greedy_generate
from nanoseek.infer.sampler import apply_penalties, logprobs_of, sample_from_probs, truncate


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny", initializer_range=0.15)
    return nanoseek.build_model(cfg, seed=0).eval()


def _greedy(model, prompt, n):
    return greedy_generate(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()


# ---- SamplingParams ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(min_p=1.1), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(seed="1"), "seed"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs"), (dict(prompt_logprobs=1.0), "prompt_logprobs"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalization():
    p = SamplingParams(stop="###", top_k=0)
    assert p.stop == ["###"] and p.stop_token_ids == [] and not p.top_k_enabled and p.max_tokens == 16
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    assert SamplingParams(frequency_penalty=0.1).has_penalties and not SamplingParams().has_penalties


# ---- logits processors on hand-made logits ---------------------------------------------------------------

def test_penalties_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5],
                           [2.0, -1.0, 0.5, 3.0, -0.5]])
    prompt = torch.tensor([[True, False, False, False, True]] * 2)
    counts = torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0]] * 2)
    out = apply_penalties(logits, prompt, counts, repetition_B=torch.tensor([2.0, 1.0]),
                          presence_B=torch.tensor([0.5, 0.0]), frequency_B=torch.tensor([0.25, 0.0]))
    # row 0: token 0 (prompt, positive) 2/2; token 1 (output x2, negative) -1*2 - 0.5 - 2*0.25; token 4
    # (prompt, negative) -0.5*2; unseen tokens 2 and 3 untouched
    torch.testing.assert_close(out[0], torch.tensor([1.0, -3.0, 0.5, 3.0, -1.0]))
    torch.testing.assert_close(out[1], logits[1])   # neutral settings change nothing


def test_truncation_filters_on_a_known_distribution():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = p.log()[None]

    def kept(top_k=None, top_p=None, min_p=None):
        out = truncate(logits, None if top_k is None else torch.tensor([top_k]),
                       None if top_p is None else torch.tensor([top_p]),
                       None if min_p is None else torch.tensor([min_p]))
        return torch.isfinite(out[0]).nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1] and kept(top_k=5) == [0, 1, 2, 3, 4]
    assert kept(top_p=0.6) == [0, 1] and kept(top_p=0.5) == [0] and kept(top_p=0.9) == [0, 1, 2, 3]
    assert kept(top_p=1e-9) == [0]
    assert kept(min_p=0.35) == [0, 1] and kept(min_p=0.25) == [0, 1, 2] and kept(min_p=1.0) == [0]
    # top-p after top-k works on the renormalized top-k mass: {0.5, 0.2, 0.15} -> 0.59, 0.24, 0.18
    assert kept(top_k=3, top_p=0.7) == [0, 1]
    assert kept(top_k=3, top_p=0.85) == [0, 1, 2]
    surviving = truncate(logits, torch.tensor([2]), None, None)[0, :2].softmax(-1)
    torch.testing.assert_close(surviving, torch.tensor([5 / 7, 2 / 7]))


def test_inverse_cdf_sampling_skips_zero_probability_tokens():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]] * 4)
    u = torch.tensor([0.1, 0.2, 0.69, 0.999999], dtype=torch.float64)
    assert sample_from_probs(probs, u).tolist() == [0, 2, 2, 3]
    assert sample_from_probs(probs * 7, u).tolist() == [0, 2, 2, 3]   # unnormalized rows


# ---- through the engine ------------------------------------------------------------------------------

def test_top_k_1_tiny_top_p_and_min_p_1_equal_greedy(model):
    llm = LLM(model, max_num_seqs=8)
    prompts = [[5, 6, 7], [100, 200, 300, 400, 11], [42]]
    n = 24
    for kwargs in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=0.0)):
        kwargs = {"temperature": 1.3, **kwargs}
        params = [SamplingParams(max_tokens=n, seed=s, ignore_eos=True, **kwargs) for s in range(len(prompts))]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        for p, o in zip(prompts, outs):
            assert o.outputs[0].token_ids == _greedy(model, p, n), kwargs
    sampled = llm.generate([{"prompt_token_ids": prompts[0]}],
                           SamplingParams(max_tokens=n, temperature=1.3, seed=0, ignore_eos=True))[0]
    assert sampled.outputs[0].token_ids != _greedy(model, prompts[0], n), "plain sampling should leave greedy"


def test_penalties_steer_generation_in_the_right_direction(model):
    llm = LLM(model)
    prompt, n = [11, 12, 13, 14, 15, 16], 40

    def repeats(**kwargs):
        ids = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                    **kwargs))[0].outputs[0].token_ids
        return len(ids) - len(set(ids)), len(set(ids) & set(prompt))

    base, base_prompt = repeats()
    assert base >= 5, "the test model must repeat itself for this test to mean anything"
    assert repeats(repetition_penalty=20.0) == (0, 0)
    assert repeats(presence_penalty=2.0)[0] < base and repeats(frequency_penalty=2.0)[0] < base
    assert repeats(presence_penalty=-2.0)[0] > base and repeats(repetition_penalty=0.2)[0] > base


def test_seed_makes_samples_independent_of_batch_composition(model):
    target = {"prompt_token_ids": [9, 8, 7, 6, 5]}
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = LLM(model).generate(target, params)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": list(range(3, 3 + k))} for k in (2, 11, 4)]
    other_params = [SamplingParams(max_tokens=m, temperature=t, top_k=k, seed=s, ignore_eos=True)
                    for m, t, k, s in ((30, 1.0, -1, None), (5, 0.0, -1, None), (25, 0.5, 50, 3))]
    for slots in (8, 2):   # one batch / requests waiting and joining later
        outs = LLM(model, max_num_seqs=slots, seed=slots).generate(others + [target], other_params + [params])
        assert outs[-1].outputs[0].token_ids == alone, f"max_num_seqs={slots}"
        assert outs[1].outputs[0].token_ids == _greedy(model, others[1]["prompt_token_ids"], 5)
    other_seed = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1235, ignore_eos=True)
    assert LLM(model).generate(target, other_seed)[0].outputs[0].token_ids != alone
    # without SamplingParams.seed, the LLM's seed decides: same seed and order, same samples
    free = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    runs = [[o.outputs[0].token_ids for o in LLM(model, seed=s).generate([target] * 3, free)] for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0][0] != runs[0][1]


def test_temperature_sampling_frequencies_match_softmax(model):
    """The first sampled token over many seeds follows softmax(logits / T) (a z-test per likely token)."""
    prompt, T, N = [21, 22, 23], 0.5, 1500
    with torch.no_grad():
        p = (model(torch.tensor([prompt]))[0, -1] / T).softmax(-1)
    llm = LLM(model, max_num_seqs=256)
    outs = llm.generate([{"prompt_token_ids": prompt}] * N,
                        [SamplingParams(max_tokens=1, temperature=T, seed=s) for s in range(N)])
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[0] for o in outs]), minlength=p.numel()).double()
    likely = p > 0.02
    assert likely.sum() >= 3
    z = (counts[likely] - N * p[likely]) / (N * p[likely] * (1 - p[likely])).sqrt()
    assert z.abs().max() < 4.5, z
    assert math.isclose(counts.sum().item(), N)


def test_chosen_logprobs_without_top_n_equal_log_softmax():
    """Rows that want no top-n alternatives take the logsumexp shortcut (no (B, V) log_softmax); with and
    without alternatives requested, the chosen tokens' logprobs are log_softmax(logits)[token]."""
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(5, 300, generator=g)
    tokens = torch.randint(0, 300, (5,), generator=g)
    want = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    fast, none = logprobs_of(logits, tokens, [None] * 5)
    full, dicts = logprobs_of(logits, tokens, [None, 2, None, None, 0])
    torch.testing.assert_close(fast, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(full, want, rtol=0, atol=1e-5)
    assert none == [None] * 5 and dicts[0] is None and len(dicts[1]) in (2, 3) and list(dicts[4]) == [int(tokens[4])]
