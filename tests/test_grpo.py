"""GRPO trainer (nanoseek/rl/grpo.py, rollout.py) and the `nanoseek grpo` stage at tiny size.

The policy is the randomly initialised tiny preset with a 512-token BPE tokenizer: its samples are
noise, so the "toy task" rewards something a random policy does sometimes (tokens with small ids)
and GRPO must make it more frequent. Everything is seeded; runs take a few seconds each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import pytest
import torch

import nanoseek
from nanoseek.config import ConfigError
from nanoseek.data import default_corpus, train_tokenizer
from nanoseek.infer import LLM, SamplingParams
import nanoseek.rl.grpo as grpo_module
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer, equation_credit
from nanoseek.rl.rollout import Rollout, completion_logprobs, pad_batch

TIMING = {"gen_time", "train_time", "step_time", "gen_tokens_per_s", "tokens_per_s"}


def low_id_share(completions, examples=None, completion_ids=None, **_):
    """Toy reward: the share of completion tokens with id < 100 (~20% for a random policy)."""
    return [sum(t < 100 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def constant(completions, examples=None, **_):
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_init")
    tok = train_tokenizer(default_corpus(200), vocab_size=512)
    nanoseek.save_pretrained(nanoseek.build_model(nanoseek.ModelConfig.preset("tiny", vocab_size=tok.vocab_size), seed=0), d)
    tok.save(d)
    return str(d)


def toy_cfg(**kw) -> GRPOConfig:
    base = dict(steps=16, prompts_per_step=4, group_size=8, max_new_tokens=8, lr=3e-3, rewards={"low": 1.0},
                n_train_problems=10, save_every=0, tensorboard=False)
    return GRPOConfig(**{**base, **kw})


def trainer(init_dir, out, cfg, **kw) -> GRPOTrainer:
    return GRPOTrainer(cfg, init_dir, str(out), progress=False, reward_fns=kw.pop("reward_fns", {"low": low_id_share}),
                       **kw)


def rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_grpo_raises_the_toy_reward(init_dir, tmp_path):
    last = trainer(init_dir, tmp_path, toy_cfg(steps=32)).fit()
    log = rows(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 33)) and last == log[-1]
    first, final = sum(r["reward"] for r in log[:4]) / 4, sum(r["reward"] for r in log[-4:]) / 4
    assert final > first + 0.2, (first, final)   # measured: 0.19 -> 0.60
    for key in ("reward_std", "rewards/low/mean", "rewards/low/std", "accuracy", "frac_reward_zero_std", "entropy",
                "clip_ratio", "completion_len_mean", "completion_len_max", "truncated_share", "reflection_share",
                "recheck_share", "gen_time", "train_time", "tokens_per_s", "grad_norm", "lr"):
        assert key in last and math.isfinite(last[key]), key
    assert "kl" not in last                                  # beta = 0: no reference model, no KL
    assert last["ratio_mean"] == 1.0 and last["clip_ratio"] == 0.0   # mu = 1: on-policy, nothing clipped
    assert os.path.isfile(tmp_path / "reward.png") and os.path.isfile(tmp_path / "length.png")
    policy = nanoseek.from_pretrained(tmp_path / "model")
    assert os.path.isfile(tmp_path / "model" / "tokenizer.json")
    assert len(os.listdir(tmp_path / "checkpoints")) == 1    # save_every 0: the final checkpoint only
    start = nanoseek.from_pretrained(init_dir)
    assert not torch.equal(policy.lm_head.weight, start.lm_head.weight)


def test_training_logprobs_match_the_sampler(init_dir):
    """The padded training forward scores exactly what the engine sampled (sum = cumulative_logprob)."""
    model = nanoseek.from_pretrained(init_dir)
    llm = LLM(model, max_num_seqs=8)
    prompts = [[0, 5, 9, 17], [0, 3, 44, 61, 100, 7, 8]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(n=4, max_tokens=10, seed=3))
    pids = [p for p, o in zip(prompts, outs) for _ in o.outputs]
    cids = [list(c.token_ids) for o in outs for c in o.outputs]
    batch = pad_batch(pids, cids)
    assert batch.prompt_ids.shape[0] == 2 and batch.group.tolist() == [0] * 4 + [1] * 4  # each prompt once
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch)
    mask = batch.mask
    expected = torch.tensor([c.cumulative_logprob for o in outs for c in o.outputs])
    torch.testing.assert_close((logp * mask).sum(1), expected, rtol=1e-4, atol=1e-4)


def test_engine_reused_after_updates_samples_like_a_fresh_one(init_dir, tmp_path):
    tr = trainer(init_dir, tmp_path, toy_cfg(steps=2))
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train_step()
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters()))
    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = [{"prompt_token_ids": p} for p in tr.prompts[:3]]
    reused = [o.outputs[0].token_ids for o in tr.llm.generate(prompts, params)]
    fresh_model = nanoseek.from_pretrained(init_dir)
    fresh_model.load_state_dict(tr.model.state_dict())
    fresh = [o.outputs[0].token_ids for o in LLM(fresh_model, max_num_seqs=4).generate(prompts, params)]
    assert reused == fresh


def test_beta_loads_a_reference_and_logs_kl(init_dir, tmp_path):
    tr = trainer(init_dir, tmp_path, toy_cfg(steps=2, beta=0.1))
    assert tr.ref is not None and not any(p.requires_grad for p in tr.ref.parameters())
    first, second = tr.train_step(), tr.train_step()
    assert first["kl"] == 0.0                 # policy == reference before the first update
    assert 0.0 < second["kl"] < 1.0 and math.isfinite(second["kl"])
    assert trainer(init_dir, tmp_path / "b0", toy_cfg(steps=1)).ref is None


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_precision_autocasts_the_update_and_buckets_its_batches(init_dir, tmp_path, monkeypatch, precision):
    seen = []
    score = grpo_module.completion_logprobs

    def spy(model, batch, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), batch.completion_ids.shape[1]))
        return score(model, batch, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "completion_logprobs", spy)
    tr = trainer(init_dir, tmp_path, toy_cfg(steps=1, mu=2, precision=precision))
    row = tr.train_step()
    assert tr.precision == precision and math.isfinite(row["loss"]) and row["grad_norm"] > 0
    low = precision == "bf16"
    assert len(seen) == 3 * 2 and all(autocast == low for autocast, _ in seen)   # (pi_old + 2 passes) x 2 micro-batches
    assert ({width for _, width in seen} == {16}) == low     # at most 8 new tokens: bucketed to 16 in bf16 only


def test_mu_above_one_moves_the_ratio_and_clips(init_dir, tmp_path):
    row = trainer(init_dir, tmp_path, toy_cfg(steps=1, mu=4, lr=1e-2, eps_low=0.01, eps_high=0.01)).train_step()
    assert row["ratio_mean"] != 1.0
    assert row["clip_ratio"] > 0.0 and row["clip_ratio/low"] + row["clip_ratio/high"] == pytest.approx(
        row["clip_ratio"])


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_do_not_change_the_gradient(init_dir, tmp_path, loss_type):
    def grads(micro):
        tr = trainer(init_dir, tmp_path / f"{loss_type}{micro}", toy_cfg(steps=1, micro_batch=micro,
                                                                        loss_type=loss_type, grad_clip=0.0))
        seen = []
        tr.run.optimizer.step = lambda: seen.append(torch.cat([p.grad.flatten() for p in tr.model.parameters()
                                                            if p.grad is not None]))
        tr.train_step()
        return seen[0]

    whole, split = grads(32), grads(5)
    assert whole.abs().max() > 0
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())


def test_zero_variance_groups_are_filtered(init_dir, tmp_path):
    tr = trainer(init_dir, tmp_path, toy_cfg(steps=1, rewards={"const": 1.0}), reward_fns={"const": constant})
    w = tr.model.lm_head.weight.detach().clone()
    row = tr.train_step()
    assert row["frac_reward_zero_std"] == 1.0 and row["trained_completions"] == 0
    assert torch.equal(tr.model.lm_head.weight, w)          # nothing to learn, no update
    tr = trainer(init_dir, tmp_path / "keep", toy_cfg(steps=1, rewards={"const": 1.0}, filter_zero_variance=False),
                 reward_fns={"const": constant})
    assert tr.train_step()["trained_completions"] == 32


def low_ids_but_flat_on_arithmetic(completions, examples=None, completion_ids=None, **_):
    """low_id_share, except a constant on arithmetic problems: their groups have zero variance."""
    low = low_id_share(completions, completion_ids=completion_ids)
    return [1.0 if ex.task == "arithmetic" else r for ex, r in zip(examples, low)]


def test_dynamic_sampling_refills_dropped_groups(init_dir, tmp_path):
    fns = {"mixed": low_ids_but_flat_on_arithmetic}
    plain = trainer(init_dir, tmp_path / "plain", toy_cfg(steps=1, rewards={"mixed": 1.0}), reward_fns=fns).train_step()
    assert plain["rollout_prompts"] == 4 and 0 < plain["trained_completions"] < 32   # arithmetic groups dropped
    runs = [trainer(init_dir, tmp_path / f"dyn{i}", toy_cfg(steps=1, rewards={"mixed": 1.0}, dynamic_sampling=3),
                    reward_fns=fns).train_step() for i in range(2)]
    assert runs[0]["rollout_prompts"] > 4 and runs[0]["trained_completions"] == 32  # refilled to 4 groups
    assert {k: v for k, v in runs[0].items() if k not in TIMING} == {k: v for k, v in runs[1].items() if k not in TIMING}
    never = trainer(init_dir, tmp_path / "const", toy_cfg(steps=1, rewards={"const": 1.0}, dynamic_sampling=2),
                    reward_fns={"const": constant}).train_step()
    assert never["rollout_prompts"] > 4 and never["trained_completions"] == 0        # gives up after 2 rounds


def test_equation_credit_lands_on_the_equation_tokens(init_dir):
    tok = nanoseek.data.tokenizer.Tokenizer.load(init_dir)
    texts = ["<think>So 3x = 11 - 8 = 6 and x = 6 / 3 = 2.</think><answer>2</answer>",
             "<think>So 3x = 11 - 8 = 3 and x = 3 / 3 = 1.</think><answer>1</answer>"]
    ids = [tok.encode(t) + [tok.eos_id] for t in texts]
    credit = equation_credit(ids, tok, group_size=2)

    def marked(row):  # {credit: the text of the tokens that got it}
        out = {}
        for i, v in zip(ids[row], credit[row]):
            if v:
                out.setdefault(round(v, 3), []).append(i)
        return {v: tok.decode(i).strip() for v, i in out.items()}

    # steps [0, 1] and [1, 1]: mean 0.75, sample std 0.5 -> -1.5 for "11 - 8 = 6", +0.5 for the three others
    assert marked(0) == {-1.5: "11 - 8 = 6", 0.5: "6 / 3 = 2"}
    assert marked(1) == {0.5: "11 - 8 = 3 3 / 3 = 1"}
    assert equation_credit(ids[1:] * 2, tok, group_size=2) == [[0.0] * len(ids[1])] * 2  # all steps hold: no credit


def test_equation_credit_trains_groups_with_equal_outcomes(init_dir, tmp_path, monkeypatch):
    texts = ["<think>11 - 8 = 6</think><answer>1</answer>", "<think>11 - 8 = 3</think><answer>1</answer>"] * 2
    for weight in (0.0, 1.0):
        tr = trainer(init_dir, tmp_path / str(weight), toy_cfg(steps=1, prompts_per_step=1, group_size=4,
                     rewards={"const": 1.0}, equation_credit=weight), reward_fns={"const": constant})
        prompt = tr.prompts[0]
        ids = [tr.tokenizer.encode(t) + [tr.tokenizer.eos_id] for t in texts]
        problem = {"question": "Compute 11 - 8.", "answer": "3"}  # the equations' numbers are grounded in it
        fake = Rollout([prompt] * 4, ids, texts, [False] * 4, [problem] * 4, sum(map(len, ids)))
        monkeypatch.setattr(grpo_module, "sample_groups", lambda *a, fake=fake: fake)  # the trainer scores it
        w = tr.model.lm_head.weight.detach().clone()
        row = tr.train_step()
        assert row["frac_reward_zero_std"] == 1.0 and row["trained_completions"] == 4 * (weight > 0)
        assert torch.equal(tr.model.lm_head.weight, w) == (weight == 0)


def test_positive_only_trains_on_the_better_completions(init_dir, tmp_path, monkeypatch):
    """positive_only (RAFT++): the same rollout, but only completions above their group's mean reach the loss."""
    seen = []
    loss = grpo_module.grpo_loss
    monkeypatch.setattr(grpo_module, "grpo_loss", lambda logp, old, ref, adv, *a, **k: (seen.append(adv), loss(
        logp, old, ref, adv, *a, **k))[1])
    full = trainer(init_dir, tmp_path / "all", toy_cfg(steps=1)).train_step()
    assert (torch.cat(seen) < 0).any()
    seen.clear()
    pos = trainer(init_dir, tmp_path / "pos", toy_cfg(steps=1, positive_only=True)).train_step()
    adv = torch.cat(seen)
    assert pos["reward"] == full["reward"]                      # same seed, same samples and rewards
    assert (adv > 0).all() and len(adv) == pos["trained_completions"] < full["trained_completions"]


def test_resume_repeats_the_uninterrupted_run(init_dir, tmp_path):
    full = trainer(init_dir, tmp_path / "full", toy_cfg(steps=4))
    full.fit()
    trainer(init_dir, tmp_path / "cut", toy_cfg(steps=2)).fit()             # "killed" after its step-2 checkpoint
    resumed = trainer(init_dir, tmp_path / "cut", toy_cfg(steps=4), resume=True)
    assert resumed.run.step == 2
    resumed.fit()
    a, b = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_config_errors_name_the_field(init_dir, tmp_path):
    for bad, field in [(dict(group_size=1), "group_size"), (dict(loss_type="ppo"), "loss_type"),
                       (dict(scale_rewards="yes"), "scale_rewards"), (dict(eps_low=1.5), "eps_low"),
                       (dict(rewards={}), "rewards"), (dict(temperature=0), "temperature"),
                       (dict(reward_params={"cosine": {}}), "reward_params"), (dict(max_num_seqs=3), "max_num_seqs"),
                       (dict(precision="fp8"), "precision")]:
        with pytest.raises(ConfigError, match=f"GRPOConfig.{field}"):
            GRPOConfig(**bad)
    with pytest.raises(ValueError, match="unknown reward"):
        GRPOTrainer(GRPOConfig(rewards={"nope": 1.0}, n_train_problems=2), init_dir, str(tmp_path), progress=False)


# ---- the CLI stage --------------------------------------------------------------------------------

def run_cli(argv: list[str]) -> int:
    """`nanoseek.cli.main` once `grpo` is wired into it; until then the same parser and error handling."""
    from nanoseek import cli
    parser = cli.build_parser()
    wired = any("grpo" in getattr(a, "choices", {}) or {} for a in parser._actions
                if isinstance(a, argparse._SubParsersAction))
    if wired:
        return cli.main(argv)
    from nanoseek.rl.cli_grpo import add_parsers
    parser = argparse.ArgumentParser(prog="nanoseek")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def test_cli_grpo_end_to_end(init_dir, tmp_path, capsys):
    config = tmp_path / "grpo.json"
    config.write_text(json.dumps({"n_train_problems": 4, "tensorboard": False, "save_every": 1}))
    out = tmp_path / "run"
    argv = ["grpo", "--init", init_dir, "--out", str(out), "--config", str(config), "--steps", "2", "--group-size", "4",
            "--prompts-per-step", "2", "--max-new-tokens", "6", "--tasks", "arithmetic", "linear", "--no-progress"]
    assert run_cli(argv) == 0, capsys.readouterr().err
    assert "model:" in capsys.readouterr().out
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2] and "rewards/accuracy/mean" in log[0] and "rewards/format/mean" in log[0]
    assert os.path.isfile(out / "model" / "config.json") and os.path.isfile(out / "model" / "tokenizer.json")
    assert run_cli(argv[:-1] + ["--steps", "3", "--resume", "--no-progress"]) == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3]


@pytest.mark.parametrize("extra, message", [(["--group-size", "1"], "GRPOConfig.group_size"),
                                            (["--loss-type", "dapo", "--lr", "-1"], "GRPOConfig.lr"),
                                            (["--data", "missing.jsonl"], "no such file")])
def test_cli_grpo_errors_are_one_line(init_dir, tmp_path, capsys, extra, message):
    argv = ["grpo", "--init", init_dir, "--out", str(tmp_path / "o"), "--steps", "1", "--no-progress", *extra]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert run_cli(["grpo", "--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
