"""Evaluation, rejection sampling, the `sample`/`eval` CLI and the `nanoseek r1` pipeline end to end at tiny size."""

import json
import os
import shutil

import pytest
import torch

from nanoseek.cli import main
from nanoseek.data import generate, r1_completion, train_tokenizer, default_corpus
from nanoseek.infer import LLM
from nanoseek.infer.outputs import CompletionOutput, RequestOutput
from nanoseek.rl.data import load_problems, load_sft_rows, prompt_text, task_examples, write_rows
from nanoseek.rl.evaluate import EvalConfig, evaluate, majority_answer
from nanoseek.rl.pipeline import STAGES, R1Config, R1Pipeline
from nanoseek.rl.sample import SampleConfig, rejection_sample


class CannedLLM(LLM):
    """An LLM whose samples are fixed texts: tests the scoring around the engine, not the model."""

    def __init__(self, texts_per_prompt, finish_reasons=None):
        self.model = torch.nn.Linear(1, 1)
        self.texts, self.finish = texts_per_prompt, finish_reasons

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        outs = []
        for i, texts in enumerate(self.texts):
            reasons = self.finish[i] if self.finish else ["stop"] * len(texts)
            outs.append(RequestOutput(str(i), None, [], None, [CompletionOutput(j, t, [0] * (j + 1), finish_reason=r)
                                                              for j, (t, r) in enumerate(zip(texts, reasons))], True))
        return outs


class FakeTokenizer:
    bos_id = 0

    def encode(self, text):
        return [0]

    def decode(self, ids):
        return ""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return messages[0]["content"]


def answer(a):
    return f"<think>\nwork\n</think>\n<answer>{a}</answer>"


def test_majority_answer_ignores_missing_and_whitespace():
    assert majority_answer([None, "1 + 2", "3", "1+2"]) == "1 + 2"
    assert majority_answer(["3", "4"]) == "3"  # tie: first seen
    assert majority_answer([None, None]) is None


def test_evaluate_pass_at_1_and_majority():
    a, b = generate("arithmetic", "test", 2, difficulty=1, seed=0)
    texts = [[answer(a.answer), answer("0"), answer(a.answer), "no tags"],  # 2/4 right, majority right
             [answer("-1"), answer("-1"), answer(b.answer), answer(b.answer + " ")]]  # tie "-1" first: wrong
    result = evaluate(CannedLLM(texts), FakeTokenizer(), [a, b], EvalConfig(k=4))
    m = result["tasks"]["arithmetic"]
    assert m["pass@1"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert m["maj@k"] == pytest.approx(0.5)
    assert m["format"] == pytest.approx(7 / 8)
    assert m["problems"] == 2
    assert result["samples"]["arithmetic"][0]["correct"] is True


def test_rejection_sampling_filters():
    ex, = generate("linear", "train", 1, difficulty=1, seed=0)
    good = answer(ex.answer)
    texts = [[good, good + " ", answer("999"), "<answer>" + ex.answer + "</answer>", good.replace("work", " ".join(["w"] * 20)),
              good.replace("work", "other work"), good.replace("work", "third"), good]]
    reasons = [["stop"] * 7 + ["length"]]
    rows, stats = rejection_sample(CannedLLM(texts, reasons), FakeTokenizer(), [ex], SampleConfig(k=8))
    assert stats["kept"] == 2 and len(rows) == 2
    assert (stats["duplicate"], stats["wrong"], stats["malformed"], stats["repetitive"], stats["over_quota"],
            stats["truncated"]) == (1, 1, 1, 1, 1, 1)
    assert rows[0]["messages"][0] == {"role": "user", "content": ex.question}
    assert rows[0]["messages"][1]["content"] == good


def test_problem_and_sft_files_are_validated(tmp_path):
    path = tmp_path / "p.jsonl"
    write_rows(path, [{"question": "1+1?", "answer": "2"}, generate("linear", "test", 1)[0].to_dict()])
    problems = load_problems(path)
    assert problems[0]["answer"] == "2" and problems[1].task == "linear"
    write_rows(path, [{"question": "1+1?"}])
    with pytest.raises(ValueError, match="row 1 lacks"):
        load_problems(path)
    path.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(ValueError, match="ending with an assistant"):
        load_sft_rows(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="p.jsonl:1: not valid JSON"):
        load_sft_rows(path)


def test_prompts_put_the_border_before_think():
    tok = train_tokenizer(default_corpus(200), vocab_size=400)
    ex = task_examples(["arithmetic"], "test", 1)[0]
    for template in ("chat", "r1_zero"):
        prompt = prompt_text(ex, tok, template)
        ids = tok.encode(prompt)
        assert ids[0] == tok.bos_id
        assert tok.encode(prompt + r1_completion(ex)) == ids + tok.encode(r1_completion(ex))


TINY_R1 = {
    "tasks": ["arithmetic", "linear"], "preset": "tiny", "pretrain_docs": 40,
    "pretrain": {"max_steps": 3, "batch_size": 2, "seq_len": 128, "val_every": 0, "save_every": 0, "vocab_size": 400,
                 "warmup_steps": 1, "peak_gflops": 1.0},
    "student_pretrain": {"max_steps": 2, "batch_size": 2, "seq_len": 128, "val_every": 0, "save_every": 0,
                         "warmup_steps": 1, "peak_gflops": 1.0, "balance": "none",
                         "model": {"n_routed_experts": 0, "num_hidden_layers": 1, "num_nextn_predict_layers": 0}},
    "cold_start_examples": 4, "cold_start": {"max_steps": 2, "batch_size": 4, "seq_len": 256},
    "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "save_every": 0},
    "sample_problems": 3, "sample": {"k": 2, "max_new_tokens": 8},
    "rs_sft": {"max_steps": 2, "batch_size": 4, "seq_len": 256},
    "rl2": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "save_every": 0},
    "distill": {"max_steps": 2, "batch_size": 4, "seq_len": 256},
    "student_grpo": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "save_every": 0,
                     "template": "r1_zero"},
    "eval_problems": 2, "eval": {"k": 2, "max_new_tokens": 8},
}


def test_r1_pipeline_end_to_end_and_resume(tmp_path, capsys):
    config = tmp_path / "r1.json"
    config.write_text(json.dumps(TINY_R1))
    out = tmp_path / "run"
    assert main(["r1", "--out", str(out), "--config", str(config), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == list(STAGES)
    for stage in report["stages"]:
        if stage["name"] != "sample":
            assert set(stage["tasks"]) == {"arithmetic", "linear"}
            assert 0.0 <= stage["tasks"]["linear"]["pass@1"] <= 1.0 and stage["seconds"] > 0
    assert "| cold_start | chat |" in (out / "report.md").read_text()
    # a finished run is skipped; removing one stage's record reruns only that stage
    os.remove(out / "rl2" / "stage.json")
    capsys.readouterr()
    assert main(["r1", "--out", str(out), "--config", str(config), "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "[r1] pretrain: done earlier, skipped" in log and "[r1] rl2: starting" in log
    assert "[r1] grpo: starting" not in log
    # a moved run resumes from its own models: records hold them relative to the run folder
    moved = tmp_path / "moved"
    out.rename(moved)
    os.remove(moved / "rl2" / "stage.json")
    assert main(["r1", "--out", str(moved), "--config", str(config), "--no-progress"]) == 0
    assert "[r1] rl2: starting" in capsys.readouterr().out
    # an older record's path (as given then) is re-anchored at its stage folder, never followed elsewhere
    record = json.loads((moved / "rs_sft" / "stage.json").read_text())
    assert record["model"] == "rs_sft/model"
    (moved / "rs_sft" / "stage.json").write_text(json.dumps({**record, "model": "elsewhere/rs_sft/model"}))
    assert R1Pipeline(R1Config(), str(moved)).model_of("rs_sft") == str(moved / "rs_sft" / "model")
    shutil.rmtree(moved / "rs_sft" / "model")
    with pytest.raises(ValueError, match="not in"):
        R1Pipeline(R1Config(), str(moved)).model_of("rs_sft")
    # the stage CLIs on the pipeline's checkpoints
    model = str(moved / json.loads((moved / "cold_start" / "stage.json").read_text())["model"])
    rows = tmp_path / "rs.jsonl"
    assert main(["sample", "--model", model, "--out", str(rows), "--tasks", "linear", "--n", "2", "--k", "2",
                 "--max-new-tokens", "8"]) == 0
    assert rows.exists()
    assert main(["eval", "--model", model, "--tasks", "linear", "--n", "2", "--k", "2", "--max-new-tokens", "8",
                 "--json"]) == 0
    assert "pass@1" in capsys.readouterr().out


def test_r1_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": 1}))
    assert main(["r1", "--out", str(tmp_path / "x"), "--config", str(bad)]) == 2
    with pytest.raises(ValueError, match="unknown stage"):
        R1Pipeline(R1Config(eval_problems=1), str(tmp_path / "y")).run(["warmup"])
