"""MTP self-speculative decoding: greedy output is plain greedy token for token, the MTP cache holds
what a training-time MTP forward computes, and sampled outputs keep the plain sampler's distribution
(a chi-square test that an always-accept rule fails)."""

from __future__ import annotations

import math

import pytest
import torch

import nanoseek
from nanoseek import ModelConfig
from nanoseek.infer import LLM, LLMEngine, SamplingParams, greedy_generate, speculative
from nanoseek.infer.model_runner import ModelRunner
from nanoseek.infer.sampler import truncate


def _random_mtp_model() -> nanoseek.Transformer:
    """Two layers and an untrained MTP module: its drafts are almost always rejected."""
    return nanoseek.build_model(ModelConfig.preset("tiny", initializer_range=0.15), seed=21).eval()


def _agreeing_mtp_model() -> nanoseek.Transformer:
    """One MoE layer whose copy is the MTP block: eh_proj passes the (unit-RMS-scaled) embedding through
    and ignores the hidden state, so MTP at position i recomputes the main model at i+1 without token 0
    in its context. Its drafts are right often, not always: both verification outcomes occur."""
    cfg = ModelConfig.preset("tiny", initializer_range=0.15, num_hidden_layers=1, first_k_dense_replace=0)
    model = nanoseek.build_model(cfg, seed=0).eval()
    D, rms = cfg.hidden_size, 0.15
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.mul_(rms / emb.pow(2).mean(-1, keepdim=True).sqrt())      # enorm(emb) = emb / rms for every row
        mtp = model.mtp[0]
        mtp.load_state_dict(model.model.layers[0].state_dict(), strict=False)
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :D] = rms * torch.eye(D)
        mtp.shared_head.norm.weight.copy_(model.model.norm.weight)
    return model


def _prompts(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- greedy: identical tokens ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["agreeing", "random"])
def test_speculative_greedy_equals_plain_greedy(which):
    model = _agreeing_mtp_model() if which == "agreeing" else _random_mtp_model()
    prompts = _prompts(model.cfg.vocab_size, [4, 9, 1, 13, 6], seed=1)
    lengths = [37, 20, 25, 9, 30]   # odd counts: a step that could commit two tokens may only take one
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    llm = LLM(model, max_num_seqs=3, speculative="mtp")   # 5 requests, 3 slots: requests join mid-way
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, n, o in zip(prompts, lengths, outs):
        assert o.outputs[0].token_ids == greedy_generate(model, torch.tensor([p]), n)[0, len(p):].tolist()
        assert o.outputs[0].finish_reason == "length"
    s = llm.spec_stats
    assert s["drafted"] > 0 and s["accepted"] < s["drafted"], s
    if which == "agreeing":
        assert s["accepted"] > 0.25 * s["drafted"], s
        steps = llm.stats.decode_steps
        assert steps < sum(lengths) - len(lengths) - s["accepted"] // 2, "accepted drafts must save steps"
    # penalties and stop tokens through the two-token commit: the bonus token is penalized with the draft
    # in its context, and a stop on the first token drops the bonus
    stop_id = outs[0].outputs[0].token_ids[17]
    for extra in (dict(frequency_penalty=-0.5), dict(presence_penalty=1.0, repetition_penalty=0.6),
                  dict(stop_token_ids=[stop_id])):
        plain = LLM(model, max_num_seqs=3).generate([{"prompt_token_ids": p} for p in prompts],
                                                    SamplingParams(max_tokens=30, temperature=0.0, **extra))
        spec = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=30, temperature=0.0, **extra))
        assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain], extra


def test_acceptance_counters_move_both_ways_and_drafts_match_training_time_mtp():
    """During speculative decoding, every running sequence's MTP cache layer holds exactly what the
    training-time MTP forward (main hidden h_i with token i+1, all positions at once) writes: the drafts saw
    the right inputs. Checked after every step, so also after a sequence moved to a lower slot when another
    finished (the rows' lengths differ because each step commits one or two tokens per row)."""
    model = _agreeing_mtp_model()
    cfg = model.cfg
    engine = LLMEngine(model, max_num_seqs=3, speculative="mtp")
    prompts = _prompts(cfg.vocab_size, [5, 2, 8], seed=4)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    L, moved = cfg.num_hidden_layers, False
    first_slot = {}
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running_seqs():
            moved |= first_slot.setdefault(seq.request.request_id, seq.slot) != seq.slot
            ids = seq.prompt_ids + seq.output_ids
            N = len(ids)
            ref = ModelRunner(model, 1, N, with_mtp=True)
            h = ref.prefill([ids], [0])
            ref.mtp_fill(h[:, :N - 1], [ids[1:]], [0])
            got, want, s, M = engine.runner.cache, ref.cache, seq.slot, max(N - 4, 0)
            torch.testing.assert_close(got.kv[:L, s, :N - 1], want.kv[:L, 0, :N - 1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got.kv[L, s, :M], want.kv[L, 0, :M], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got.pe[L, s, :M], want.pe[L, 0, :M], atol=1e-4, rtol=1e-4)
    assert moved, "no sequence changed slots: the test no longer covers the cache copies of compaction"
    drafted, accepted = engine.stats.spec_drafted, engine.stats.spec_accepted
    assert 0 < accepted < drafted


# ---- sampling: the output distribution is the plain sampler's ----------------------------------------------

def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty); z = 3.09 is the 0.999 normal quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic against probabilities p, bins with expected count < 5 pooled into one."""
    n = counts.sum()
    big = n * p >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([n * p[big], n * p[~big].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def _exact_second_token(model, prompt, T, top_k, top_p):
    """P(2nd generated token) = sum_t1 p(t1 | prompt) p(. | prompt, t1), both under the same processing."""
    V = model.cfg.vocab_size

    def dist(logits):
        k = torch.full((logits.shape[0],), top_k if top_k > 0 else V)
        return truncate(logits / T, k, torch.full((logits.shape[0],), top_p), None).softmax(-1)

    with torch.no_grad():
        p1 = dist(model(torch.tensor([prompt]))[:, -1])[0]
        both = torch.cat([torch.tensor([prompt]).expand(V, -1), torch.arange(V)[:, None]], dim=1)
        p2 = dist(model(both)[:, -1])
    return (p1[:, None] * p2).sum(0).double()


def _second_tokens(model, prompt, n, speculative_, **params):
    llm = LLM(model, max_num_seqs=512, speculative=speculative_, seed=1)
    outs = llm.generate([{"prompt_token_ids": prompt}] * n,
                        [SamplingParams(max_tokens=2, seed=s, **params) for s in range(n)])
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[1] for o in outs]), minlength=model.cfg.vocab_size)
    return counts.double(), llm.spec_stats


@pytest.mark.parametrize("T, top_k, top_p", [(1.0, -1, 1.0), (0.8, 6, 0.9)])
def test_speculative_sampling_keeps_the_distribution(T, top_k, top_p, monkeypatch):
    cfg = ModelConfig.preset("tiny", vocab_size=12, initializer_range=0.25, max_position_embeddings=16,
                             rope_scaling=None)
    model = nanoseek.build_model(cfg, seed=5).eval()
    prompt, n = [3, 7, 1, 4], 3000
    exact = _exact_second_token(model, prompt, T, top_k, top_p)
    params = dict(temperature=T, top_k=top_k, top_p=top_p, ignore_eos=True)
    plain, _ = _second_tokens(model, prompt, n, False, **params)
    spec, stats = _second_tokens(model, prompt, n, "mtp", **params)
    assert 0.05 < stats["acceptance_rate"] < 0.95, stats
    for name, counts in (("plain", plain), ("speculative", spec)):
        chi2, df = _chi2(counts, exact)
        assert chi2 < _chi2_critical(df), f"{name}: chi2 {chi2:.1f} on {df} dof"
    tv = 0.5 * (plain / n - spec / n).abs().sum()
    assert tv < 0.06, f"total variation between plain and speculative samples {tv:.3f}"
    # the test has teeth: accepting every draft gives the MTP module's distribution instead
    monkeypatch.setattr(speculative, "acceptance_probability", lambda p, q: torch.ones_like(p))
    biased, stats = _second_tokens(model, prompt, n, "mtp", **params)
    assert stats["acceptance_rate"] == 1.0
    chi2, df = _chi2(biased, exact)
    assert chi2 > 3 * _chi2_critical(df), f"an always-accept rule went unnoticed: chi2 {chi2:.1f} on {df} dof"
