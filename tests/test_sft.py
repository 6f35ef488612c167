"""SFT and distillation: the completion-only mask, batching independence, an overfit check through the
inference engine, exact resume, dense students (with and without token-level KD) and the CLI stages."""

import argparse
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek import ModelConfig, SamplingParams
from nanoseek.config import ConfigError
from nanoseek.data import IGNORE_INDEX, default_corpus, train_tokenizer
from nanoseek.rl.cli_sft import add_parsers
from nanoseek.rl.data import cold_start_rows, prompt_text, task_examples, write_rows
from nanoseek.rl.distill import DistillConfig, distill, kd_loss
from nanoseek.rl.sft import SFTConfig, SFTTrainer
from nanoseek.rl.sft_data import SFTBatches, build_examples, collate_examples, encode_row
from nanoseek.train.metrics import read_jsonl

DENSE_STUDENT = {"n_routed_experts": 0, "num_nextn_predict_layers": 0, "hidden_size": 48}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(300), vocab_size=512)


@pytest.fixture(scope="module")
def init_dir(tok, tmp_path_factory):
    """The tiny preset (MoE + MTP), randomly initialized, saved with the tokenizer: the model to fine-tune."""
    d = tmp_path_factory.mktemp("init")
    nanoseek.save_pretrained(nanoseek.build_model(ModelConfig.preset("tiny", vocab_size=tok.vocab_size), seed=0), d)
    tok.save(d)
    return str(d)


@pytest.fixture(scope="module")
def rows():
    return cold_start_rows(task_examples(["arithmetic", "linear"], "train", 2, seed=0))


@pytest.fixture(scope="module")
def data_file(rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cold_start.jsonl"
    write_rows(path, rows)
    return str(path)


def _cfg(data_file, **kw):
    return SFTConfig(**{"data": [data_file], "seq_len": 200, "batch_size": 2, "lr": 1e-2, "log_every": 100,
                        "save_every": 0, **kw})


# ---- examples and batches ---------------------------------------------------------------------------

def test_completion_only_labels_for_both_row_kinds(tok, rows):
    chat = rows[0]
    raw = {"prompt": "Question: 2+3? Answer:", "completion": " 5"}
    cases = [(chat, prompt_text(chat["messages"][0]["content"], tok)), (raw, "<|begin_of_sentence|>" + raw["prompt"])]
    for row, prompt in cases:
        completion = row["messages"][-1]["content"] if "messages" in row else row["completion"]
        (ex,) = build_examples([row], tok, seq_len=400)
        labels = ex.labels()
        assert tok.decode(ex.tokens[:ex.n_prompt]) == prompt
        # every target before the completion is ignored; from the first completion token on, all are labelled
        assert all(t == IGNORE_INDEX for t in labels[:ex.n_prompt - 1])
        kept = labels[ex.n_prompt - 1:]
        assert IGNORE_INDEX not in kept and kept[-1] == tok.eos_id
        assert tok.decode(kept) == completion + "<|end_of_sentence|>"
    # the chat form is exactly the tokenizer's rendering of the whole conversation
    p, c = encode_row(chat, tok)
    assert tok.decode(p + c) == tok.apply_chat_template(chat["messages"], add_generation_prompt=False)
    # r1_zero renders the question as the R1-Zero prompt
    p, _ = encode_row(chat, tok, "r1_zero")
    assert tok.decode(p) == prompt_text(chat["messages"][0]["content"], tok, "r1_zero")


def test_long_rows_are_truncated_or_dropped_with_a_warning(tok, rows):
    long_prompt = {"prompt": "word " * 300, "completion": "x"}
    with pytest.warns(UserWarning, match="1 of 2 examples truncated.*1 dropped"):
        examples = build_examples([rows[0], long_prompt], tok, seq_len=40)
    assert len(examples) == 1 and len(examples[0].tokens) == 41
    assert examples[0].labels()[-1] != IGNORE_INDEX  # the completion's start survives, its EOS does not
    with pytest.raises(ValueError, match="no SFT example fits"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_examples([long_prompt], tok, seq_len=40)


def test_padded_batch_loss_equals_examples_one_by_one(tok, rows, perturb):
    """Rows hold one example each; right padding must not change any example's loss."""
    model = perturb(nanoseek.build_model(ModelConfig.preset("tiny", vocab_size=tok.vocab_size), seed=1)).eval()
    examples = build_examples(rows, tok, seq_len=200)
    assert len({len(ex.tokens) for ex in examples}) > 1  # padding actually happens
    with torch.no_grad():
        ids, labels = collate_examples(examples, tok.pad_id)
        batched = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction="sum")
        alone = sum(F.cross_entropy(model(i)[0], l[0], reduction="sum")
                    for i, l in (collate_examples([ex], tok.pad_id) for ex in examples))
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-4)


def test_batches_cover_each_epoch_group_by_length_and_resume():
    lengths = [5, 90, 7, 88, 6, 91, 8, 87, 50]
    it = SFTBatches(lengths, batch_size=2, seed=3, group_by_length=True)
    epoch = [next(it) for _ in range(it.per_epoch)]
    assert sorted(i for b in epoch for i in b) == list(range(9))  # every example once, the odd one too
    # similar lengths share a batch: the batches are consecutive runs of the lengths sorted (one window here)
    desc = sorted(lengths, reverse=True)
    runs = sorted(sorted(desc[i:i + 2]) for i in range(0, 9, 2))
    assert sorted(sorted(lengths[i] for i in b) for b in epoch) == runs
    plain = SFTBatches(lengths, batch_size=2, seed=3, group_by_length=False)
    assert [len(next(plain)) for _ in range(plain.per_epoch)] == [2, 2, 2, 2, 1]
    state = it.state_dict()
    ahead = [next(it).tolist() for _ in range(7)]
    again = SFTBatches(lengths, batch_size=2, seed=3, group_by_length=True)
    again.load_state_dict(state)
    assert [next(again).tolist() for _ in range(7)] == ahead
    with pytest.raises(ValueError, match="batch_size"):
        SFTBatches(lengths, batch_size=4, seed=3).load_state_dict(state)


# ---- training -----------------------------------------------------------------------------------

def test_sft_overfits_and_the_engine_reproduces_the_target(tok, init_dir, rows, data_file, tmp_path):
    out = str(tmp_path / "sft")
    last = SFTTrainer(_cfg(data_file, max_examples=2, epochs=120, batch_size=2, warmup_ratio=0.0), init_dir, out,
                      progress=False).fit()
    metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(metrics) == 120 and last["step"] == 120
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "epoch"} <= set(metrics[0])
    assert metrics[-1]["loss"] < 0.05 < 2.0 < metrics[0]["loss"]
    llm = nanoseek.LLM(os.path.join(out, "model"))
    for row in rows[:2]:
        target = row["messages"][-1]["content"]
        n = len(tok.encode(target)) + 1
        prompt = prompt_text(row["messages"][0]["content"], tok)
        (result,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n))
        assert result.outputs[0].text == target


def test_resume_after_a_crash_equals_the_uninterrupted_run(init_dir, data_file, tmp_path, monkeypatch):
    cfg = _cfg(data_file, max_steps=6, save_every=3, mtp_lambda=0.3, batch_size=1, grad_accum=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    SFTTrainer(cfg, init_dir, a, progress=False).fit()

    crashing = SFTTrainer(cfg, init_dir, b, progress=False)
    step = crashing.train_step

    def crash_after_four():
        if crashing.run.step == 4:
            raise KeyboardInterrupt
        return step()
    monkeypatch.setattr(crashing, "train_step", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    resumed = SFTTrainer(cfg, init_dir, b, resume=True, progress=False)
    assert resumed.run.step == 3
    resumed.fit()
    losses = [[(r["step"], r["loss"], r["mtp_loss"]) for r in read_jsonl(os.path.join(d, "metrics.jsonl"))]
              for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    ma, mb = (nanoseek.from_pretrained(os.path.join(d, "model")).state_dict() for d in (a, b))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    mi = nanoseek.from_pretrained(init_dir).state_dict()
    assert not torch.equal(ma["mtp.0.eh_proj.weight"], mi["mtp.0.eh_proj.weight"])  # mtp_lambda > 0 trains MTP


@pytest.mark.parametrize("kd_alpha", [0.0, 0.5])
def test_distill_writes_a_dense_student(init_dir, data_file, tmp_path, kd_alpha):
    out = str(tmp_path / "student")
    cfg = DistillConfig(data=[data_file], teacher=init_dir, student_preset="tiny", student=DENSE_STUDENT,
                        kd_alpha=kd_alpha, kd_temperature=2.0, seq_len=200, batch_size=2, max_steps=3, lr=1e-2)
    last = distill(cfg, out, progress=False)
    assert ("kd_loss" in last) == (kd_alpha > 0)
    if kd_alpha:
        assert 0 < last["kd_loss"] and last["loss"] == pytest.approx(0.5 * last["lm_loss"] + 2.0 * last["kd_loss"])
    student = nanoseek.from_pretrained(os.path.join(out, "model"))
    assert student.cfg.n_routed_experts == 0 and not student.moe_layers() and not len(student.mtp)
    assert student.cfg.hidden_size == 48
    assert student.num_parameters() < nanoseek.from_pretrained(init_dir).num_parameters()


def test_kd_loss_is_the_kl_on_completion_tokens():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2], [IGNORE_INDEX, IGNORE_INDEX, 4]])
    keep = labels != IGNORE_INDEX
    p, q = (t[keep] / 2).softmax(-1), (s[keep] / 2).softmax(-1)
    torch.testing.assert_close(kd_loss(s, t, labels, 2.0), (p * (p.log() - q.log())).sum())
    assert kd_loss(t, t, labels).abs() < 1e-6


# ---- configuration and CLI ------------------------------------------------------------------------

def test_config_errors_name_the_field_and_files_load(tmp_path):
    with pytest.raises(ConfigError, match="SFTConfig.seq_len"):
        SFTConfig(seq_len=0)
    with pytest.raises(ConfigError, match="SFTConfig.template"):
        SFTConfig(template="alpaca")
    with pytest.raises(ConfigError, match="DistillConfig.teacher is needed when kd_alpha > 0"):
        DistillConfig(kd_alpha=0.5, student_init="x")
    (tmp_path / "c.toml").write_text('lr = 5e-4\nepochs = 3\n[student]\nnum_hidden_layers = 1\n')
    cfg = DistillConfig.load(tmp_path / "c.toml", teacher="t", epochs=None, batch_size=4)
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.student) == (5e-4, 3, 4, {"num_hidden_layers": 1})
    (tmp_path / "c.json").write_text(json.dumps({"lr": 1e-4, "bogus": 1}))
    with pytest.raises(ConfigError, match="bogus"):
        SFTConfig.load(tmp_path / "c.json")


def _run(argv):
    parser = argparse.ArgumentParser(prog="nanoseek")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_sft_then_distill(init_dir, data_file, tmp_path, capsys):
    sft_out, student_out = str(tmp_path / "sft"), str(tmp_path / "distill")
    _run(["sft", "--init", init_dir, "--data", data_file, "--out", sft_out, "--max-steps", "2", "--seq-len", "200",
          "--batch-size", "2", "--no-progress"])
    assert "done: step 2" in capsys.readouterr().out
    _run(["distill", "--teacher", os.path.join(sft_out, "model"), "--data", data_file, "--out", student_out,
          "--student-preset", "tiny", "--kd-alpha", "0.3", "--max-steps", "2", "--seq-len", "200",
          "--batch-size", "2", "--no-progress"])
    assert "token-level KD" in capsys.readouterr().out
    llm = nanoseek.LLM(os.path.join(student_out, "model"))
    assert llm.generate("<|begin_of_sentence|>", SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids
    # resuming a finished run trains nothing more and keeps the model
    _run(["sft", "--init", init_dir, "--data", data_file, "--out", sft_out, "--max-steps", "2", "--seq-len", "200",
          "--batch-size", "2", "--no-progress", "--resume"])
    assert "resuming at step 2" in capsys.readouterr().out


def test_cli_errors_are_clear(init_dir, data_file, tmp_path):
    out = ["--out", str(tmp_path / "o"), "--seq-len", "200"]
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.jsonl"):
        _run(["sft", "--init", init_dir, "--data", str(tmp_path / "missing.jsonl"), *out])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="row 1: 'messages' must .* end"):
        _run(["sft", "--init", init_dir, "--data", str(bad), *out])
    no_tok = tmp_path / "no_tok"
    nanoseek.save_pretrained(nanoseek.build_model(ModelConfig.preset("tiny"), seed=0), no_tok)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        _run(["sft", "--init", str(no_tok), "--data", data_file, *out])
    with pytest.raises(ConfigError, match="seq_len 4096 exceeds"):
        _run(["sft", "--init", init_dir, "--data", data_file, *out, "--seq-len", "4096"])
