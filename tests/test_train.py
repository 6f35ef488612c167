"""Pretraining: exact resume, crash safety, NaN handling, balancing mechanics, metrics and the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import nanoseek
from nanoseek.train import TrainConfig, Trainer, TrainingAborted
from nanoseek.train import trainer as trainer_mod
from nanoseek.train.balance import ExpertLoad, RoutingRecorder, sequence_balance_loss
from nanoseek.train.metrics import read_jsonl
from nanoseek.train.schedule import lr_at, piecewise
from nanoseek.train.state import list_checkpoints

TINY = dict(preset="tiny", corpus_docs=300, vocab_size=512, seq_len=64, batch_size=4, max_steps=6, save_every=3,
            val_every=3, val_batches=2, log_every=3, peak_gflops=100.0, warmup_steps=2)


def _losses(out):
    return [r["loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Trainer(TrainConfig(**TINY), a, progress=False).fit()
    Trainer(TrainConfig(**{**TINY, "max_steps": 3}), b, progress=False).fit()
    resumed = Trainer(TrainConfig(**TINY), b, resume=True, progress=False)
    assert resumed.run.step == 3
    resumed.fit()
    assert _losses(a) == _losses(b) and len(_losses(a)) == 6
    # the bias (aux-loss-free balancing) moved and was restored exactly
    ma, mb = nanoseek.from_pretrained(list_checkpoints(a + "/checkpoints")[-1]), \
        nanoseek.from_pretrained(list_checkpoints(b + "/checkpoints")[-1])
    (_, moe_a), (_, moe_b) = ma.moe_layers()[0], mb.moe_layers()[0]
    assert moe_a.gate.e_score_correction_bias.abs().sum() > 0
    assert torch.equal(moe_a.gate.e_score_correction_bias, moe_b.gate.e_score_correction_bias)


def test_outputs_metrics_plots_and_hf_loadable_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    Trainer(TrainConfig(**TINY), out, progress=False).fit()
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    for key in ("step", "loss", "lm_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_vio",
                "max_vio_per_layer"):
        assert key in rows[-1], key
    assert "val_loss" in rows[2] and "val_loss" in rows[5]
    for name in ("loss.png", "expert_load.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    assert os.listdir(os.path.join(out, "tensorboard"))
    ckpt = list_checkpoints(os.path.join(out, "checkpoints"))
    assert [os.path.basename(c) for c in ckpt] == ["step-000003", "step-000006"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(ckpt[-1]))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt[-1]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(ckpt[-1])
    ids = torch.tensor([tok.encode("12 + 7 = 19")])
    ours = nanoseek.from_pretrained(ckpt[-1])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_nan_loss_skips_then_aborts(tmp_path, monkeypatch):
    real = trainer_mod.language_model_losses
    calls = {"n": 0}

    def flaky(model, ids, labels, mtp=True):
        calls["n"] += 1
        lm, mtp_losses = real(model, ids, labels, mtp)
        return (lm * float("nan") if calls["n"] == 2 else lm), mtp_losses

    monkeypatch.setattr(trainer_mod, "language_model_losses", flaky)
    t = Trainer(TrainConfig(**{**TINY, "max_steps": 4, "save_every": 0, "val_every": 0}), str(tmp_path / "a"),
                progress=False)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train_step()
    after_good = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert t.train_step() is None and t.run.bad_steps == 1     # the NaN step: skipped, weights untouched
    assert all(torch.equal(after_good[k], v) for k, v in t.model.state_dict().items())
    assert any(not torch.equal(before[k], after_good[k]) for k in before)
    assert all(int(moe.tokens_per_expert.sum()) == 0 for _, moe in t.model.moe_layers())  # its counts dropped
    row = t.train_step()
    assert row["step"] == 3 and t.run.bad_steps == 0

    monkeypatch.setattr(trainer_mod, "language_model_losses",
                        lambda m, i, l, mtp=True: (torch.tensor(float("inf"), requires_grad=True), []))
    t2 = Trainer(TrainConfig(**{**TINY, "max_bad_steps": 2}), str(tmp_path / "b"), progress=False)
    with pytest.raises(TrainingAborted, match="2 consecutive"):
        t2.fit()


def test_bias_update_moves_against_load():
    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny"), seed=0)
    (name, moe), = [m for m in model.moe_layers() if not m[0].startswith("mtp")]
    load = ExpertLoad(model.moe_layers(), gamma_at=lambda: 0.001)
    moe.tokens_per_expert.copy_(torch.tensor([10, 0, 5, 5, 5, 5, 5, 5]))     # expert 0 over-, 1 under-loaded
    load.step()
    bias = moe.gate.e_score_correction_bias
    assert bias[0] == pytest.approx(-0.001) and bias[1] == pytest.approx(0.001) and bias[2] == 0
    assert load.max_vio() == {name: pytest.approx((10 - 5) / 5)}   # the MTP block did not run: left out
    assert int(moe.tokens_per_expert.sum()) == 0                    # read, then zeroed for the next step


def test_sequence_balance_loss_matches_equations():
    cfg = nanoseek.ModelConfig.preset("tiny", num_nextn_predict_layers=0)
    model = nanoseek.build_model(cfg, seed=0).train()
    recorder = RoutingRecorder(model)
    B, T = 2, 5
    model(torch.randint(0, cfg.vocab_size, (B, T)))
    routing = recorder.take()
    (_, scores, idx), = routing
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    expected = 0.0
    for b in range(B):
        s, chosen = scores[b * T:(b + 1) * T], idx[b * T:(b + 1) * T]
        for i in range(E):
            f_i = E / (K * T) * (chosen == i).sum().item()                              # eq. 18
            P_i = (s[:, i] / s.sum(-1)).mean().item()                                   # eqs. 19-20
            expected += f_i * P_i
    got = sequence_balance_loss(routing, B, alpha=0.5).item()
    assert got == pytest.approx(0.5 * expected / B, rel=1e-5)


def test_schedules():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0, 10, "wsd", decay_frac=0.2) == 1.0
    assert lr_at(100, 100, 1.0, 10, "wsd", min_ratio=0.0) == pytest.approx(0.0)
    assert piecewise(5, 100, 0.3, 0.1, 0.5) == 0.3 and piecewise(60, 100, 0.3, 0.1, 0.5) == 0.1


def test_bad_config_is_named():
    with pytest.raises(nanoseek.ConfigError, match="TrainConfig.balance"):
        TrainConfig(balance="magic")
    with pytest.raises(nanoseek.ConfigError, match="seq_len"):
        TrainConfig(seq_len=0)


def test_compiled_loss_trains_like_eager(tmp_path):
    cfg = {**TINY, "max_steps": 3, "save_every": 0, "log_every": 1, "model": {"num_hidden_layers": 2}}
    Trainer(TrainConfig(**cfg), str(tmp_path / "eager"), progress=False).fit()
    compiled = Trainer(TrainConfig(**cfg, compile=True), str(tmp_path / "compiled"), progress=False)
    compiled.fit()
    assert compiled._losses is not trainer_mod.language_model_losses        # the loss went through torch.compile
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-5)
    for wrong in ({"pp": 2}, {"dsa_stage": "sparse"}, {"precision": "fp8"}, {"compile": "yes"}):
        with pytest.raises(nanoseek.ConfigError, match="TrainConfig.compile"):
            TrainConfig(**{"compile": True, **wrong})


def test_cli_train_sigkill_leaves_loadable_checkpoint(tmp_path):
    cfg = {**TINY, "max_steps": 400, "save_every": 2, "val_every": 0}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek.cli", "train", "--config", str(tmp_path / "cfg.json"), "--out", str(out),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(str(out / "checkpoints"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = list_checkpoints(str(out / "checkpoints"))
    assert ckpts, "no checkpoint was completed before the kill"
    nanoseek.from_pretrained(ckpts[-1])                  # the newest complete checkpoint loads
    resumed = subprocess.run(cmd[:-1] + ["--max-steps", str(int(ckpts[-1][-6:]) + 2), "--resume", "--no-progress"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout


def test_cli_tokenizer_then_train_with_it(tmp_path):
    from nanoseek.cli import main
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document {i}: {i} + {i} = {2 * i}"}) for i in range(400)))
    assert main(["tokenizer", "--out", str(tmp_path / "tok"), "--data", str(docs), "--vocab-size", "300"]) == 0
    assert main(["tokenizer", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing.jsonl")]) == 2
    cfg = {**TINY, "max_steps": 2, "save_every": 0, "val_every": 0, "seq_len": 32}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"), "--data", str(docs),
                 "--tokenizer", str(tmp_path / "tok"), "--no-progress"]) == 0
    model = nanoseek.from_pretrained(list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1])
    from nanoseek.data import Tokenizer
    assert model.cfg.vocab_size == Tokenizer.load(str(tmp_path / "tok")).vocab_size


def test_dense_model_trains_and_plots(tmp_path):
    out = str(tmp_path / "dense")
    cfg = TrainConfig(**{**TINY, "max_steps": 2, "save_every": 0, "val_every": 0, "balance": "none",
                         "model": {"n_routed_experts": 0}})
    t = Trainer(cfg, out, progress=False)
    assert not t.model.moe_layers()
    t.fit()
    assert os.path.isfile(os.path.join(out, "loss.png")) and not os.path.exists(os.path.join(out, "expert_load.png"))


def test_routing_is_recorded_and_counted_in_training_forwards_only():
    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny"), seed=0)
    recorder, load = RoutingRecorder(model), ExpertLoad(model.moe_layers())
    ids = torch.randint(0, model.cfg.vocab_size, (2, 8))
    with torch.no_grad():
        model.eval()(ids)                        # inference: nothing recorded, nothing counted
        assert not recorder.take() and all(int(m.tokens_per_expert.sum()) == 0 for _, m in model.moe_layers())
        model.train()(ids)                       # main model only: the MTP block's MoE does not run
        model(ids)
    assert [r.layer for r in recorder.take()] == ["model.layers.1.mlp"] * 2 and not recorder.take()
    load.step()
    assert list(load.counts) == ["model.layers.1.mlp"]
    assert load.counts["model.layers.1.mlp"].sum() == 2 * 2 * 8 * model.cfg.num_experts_per_tok
