"""Reliability: damaged checkpoints, damaged data and bad flags each end in one clear error naming the file,
tensor, row, field or flag (CheckpointError from the API; exit code 2 and one stderr line from the CLI), and a
resume falls back past a damaged checkpoint without changing the losses."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError, ConfigError
from nanoseek.cli import main
from nanoseek.data import default_corpus, load_documents, train_tokenizer
from nanoseek.rl.data import load_problems, load_sft_rows, task_examples, write_rows
from nanoseek.train import TrainConfig, Trainer
from nanoseek.train.data import prepare_data
from nanoseek.train.metrics import read_jsonl
from nanoseek.train.run import TrainingRun
from nanoseek.train.state import list_checkpoints

TINY = dict(preset="tiny", corpus_docs=300, vocab_size=512, seq_len=64, batch_size=4, max_steps=6, save_every=3,
            val_every=3, val_batches=2, log_every=3, peak_gflops=100.0, warmup_steps=2)
NORM = "model.norm.weight"


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expecting a user error: exit code 2 and exactly one stderr line, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- checkpoints ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny preset with a tokenizer, saved single-file and sharded."""
    tok = train_tokenizer(default_corpus(60), vocab_size=300)
    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny", vocab_size=tok.vocab_size), seed=0)
    out = {}
    for kind, shard in (("single", None), ("sharded", 50_000)):
        d = tmp_path_factory.mktemp(kind)
        nanoseek.save_pretrained(model, d, max_shard_bytes=shard)
        tok.save(d)
        out[kind] = str(d)
    return out


def _edit_json(file, change):
    with open(file) as f:
        obj = json.load(f)
    change(obj)
    with open(file, "w") as f:
        json.dump(obj, f)


def _write(file, data: bytes | str):
    with open(file, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def _truncate(file):
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)


def _set_weight(value):
    def change(d):
        tensors = load_file(f"{d}/model.safetensors")
        tensors[NORM][3] = value
        save_file(tensors, f"{d}/model.safetensors", metadata={"format": "pt"})
    return change


def _index_entry_outside(d):
    _edit_json(f"{d}/model.safetensors.index.json", lambda idx: idx["weight_map"].update({NORM: "../x.safetensors"}))


def _first_shard(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0]


# (id, folder kind, damage, names that the message must contain, whether from_pretrained reads the damaged file)
_DAMAGE = [
    ("truncated", "single", lambda d: _truncate(f"{d}/model.safetensors"), ["model.safetensors"], True),
    ("truncated shard", "sharded", lambda d: _truncate(f"{d}/{_first_shard(d)}"), ["model-00001-of-"], True),
    ("empty", "single", lambda d: _write(f"{d}/model.safetensors", b""), ["model.safetensors"], True),
    ("garbage", "single", lambda d: _write(f"{d}/model.safetensors", os.urandom(4096)),
     ["model.safetensors"], True),
    ("config not an object", "single", lambda d: _write(f"{d}/config.json", "[1, 2]"),
     ["config.json", "object"], True),
    ("config invalid JSON", "single", lambda d: _write(f"{d}/config.json", "{oops"),
     ["config.json", "line 1"], True),
    ("index without weight_map", "sharded",
     lambda d: _write(f"{d}/model.safetensors.index.json", '{"metadata": {}}'),
     ["model.safetensors.index.json", "weight_map"], True),
    ("index entry outside", "sharded", _index_entry_outside, ["model.safetensors.index.json", NORM, "outside"], True),
    ("bad torch_dtype", "single", lambda d: _edit_json(f"{d}/config.json", lambda c: c.update(torch_dtype="float33")),
     ["config.json", "torch_dtype", "float33"], True),
    ("corrupt tokenizer.json", "single", lambda d: _write(f"{d}/tokenizer.json", "{not json"),
     ["tokenizer.json"], False),
    ("template syntax error", "single",
     lambda d: _edit_json(f"{d}/tokenizer_config.json", lambda c: c.update(chat_template="{% for m in %}")),
     ["tokenizer_config.json", "chat_template line 1"], False),
    ("NaN weight", "single", _set_weight(float("nan")), [NORM, "1 NaN", "allow_non_finite"], True),
    ("Inf weight", "single", _set_weight(float("inf")), [NORM, "1 Inf", "--allow-non-finite"], True),
]


@pytest.fixture
def damaged(folders, tmp_path):
    def make(kind, damage) -> str:
        d = str(tmp_path / "damaged")
        shutil.copytree(folders[kind], d)
        damage(d)
        return d
    return make


@pytest.mark.parametrize("kind, damage, names, model_file", [c[1:] for c in _DAMAGE], ids=[c[0] for c in _DAMAGE])
def test_damaged_checkpoint_is_one_error_naming_the_file(kind, damage, names, model_file, damaged, capsys):
    d = damaged(kind, damage)
    errors = []
    if model_file:
        with pytest.raises(CheckpointError) as info:
            nanoseek.from_pretrained(d)
        errors.append(str(info.value))
    with pytest.raises(CheckpointError) as info:
        nanoseek.LLM(d)
    errors.append(str(info.value))
    errors.append(_cli_error(capsys, ["generate", d, "--prompt", "x", "--device", "cpu"]))
    for message in errors:
        assert all(name in message for name in names), (names, message)
    assert errors[-1].startswith("nanoseek generate: error: ")


def test_non_finite_weights_load_when_allowed(damaged, capsys):
    d = damaged("single", _set_weight(float("nan")))
    model = nanoseek.from_pretrained(d, allow_non_finite=True)
    assert torch.isnan(model.model.norm.weight).sum() == 1
    assert main(["info", "--model", d, "--allow-non-finite"]) == 0
    assert "parameters" in capsys.readouterr().out


def test_index_entries_in_subfolders_and_symlinks_to_outside_load(folders, tmp_path):
    """Only index entries naming a path outside the folder are refused, not symlinks: the HF cache links every
    file of a snapshot folder to a blob outside it."""
    d = tmp_path / "snapshot"
    shutil.copytree(folders["sharded"], d)
    first, second = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[:2]
    os.makedirs(tmp_path / "blobs")
    os.replace(d / first, tmp_path / "blobs" / "blob")
    os.symlink(tmp_path / "blobs" / "blob", d / first)
    os.makedirs(d / "sub")
    os.replace(d / second, d / "sub" / second)
    _edit_json(d / "model.safetensors.index.json", lambda idx: idx["weight_map"].update(
        {name: f"sub/{second}" for name, file in idx["weight_map"].items() if file == second}))
    nanoseek.from_pretrained(d)


# ---- resume -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    """A 6-step tiny run (checkpoints at steps 3 and 6) and its losses."""
    out = str(tmp_path_factory.mktemp("run6") / "run")
    Trainer(TrainConfig(**TINY), out, progress=False).fit()
    return out, [r["loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture
def run_copy(run6, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(run6[0], out)
    return out, os.path.join(out, "checkpoints")


def test_resume_falls_back_past_truncated_weights_and_reproduces_the_losses(run6, run_copy):
    out, ckpts = run_copy
    _truncate(os.path.join(ckpts, "step-000006", "model.safetensors"))
    os.makedirs(os.path.join(ckpts, "step-000009.tmp", "trainer_state"))
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-000006.*model\.safetensors"):
        resumed = Trainer(TrainConfig(**TINY), out, resume=True, progress=False)
    assert resumed.run.step == 3
    assert not os.path.exists(os.path.join(ckpts, "step-000009.tmp"))
    resumed.fit()
    assert [r["loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))] == run6[1]
    assert [os.path.basename(c) for c in list_checkpoints(ckpts)] == ["step-000003", "step-000006"]
    nanoseek.from_pretrained(os.path.join(ckpts, "step-000006"))  # rewritten whole


def test_every_start_removes_stale_tmp_folders(tmp_path):
    stale = tmp_path / "checkpoints" / "step-000004.tmp"
    os.makedirs(stale / "trainer_state")
    keep = tmp_path / "checkpoints" / "notes.tmp"
    keep.write_text("not a checkpoint's")
    TrainingRun(tmp_path, seed=0, device="cpu", tensorboard=False)
    assert not stale.exists() and keep.exists()


def test_resume_refuses_when_no_checkpoint_loads(run_copy):
    out, ckpts = run_copy
    for step in ("step-000003", "step-000006"):
        _truncate(os.path.join(ckpts, step, "trainer_state", "optimizer.safetensors"))
    with pytest.raises(ValueError, match=r"no checkpoint .* can be loaded: step-000006: .*optimizer\.safetensors.*"
                                         r"step-000003"):
        TrainingRun(out, seed=0, device="cpu", resume=True, tensorboard=False)


def test_resume_with_another_preset_or_model_is_refused(run_copy, tmp_path, capsys):
    out, _ = run_copy
    with pytest.raises(ConfigError, match=r"TrainConfig\.preset \(--preset\) is 'small'.*--preset tiny"):
        Trainer(TrainConfig(**{**TINY, "preset": "small"}), out, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"TrainConfig\.model"):
        Trainer(TrainConfig(**{**TINY, "model": {"num_hidden_layers": 3}}), out, resume=True, progress=False)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    line = _cli_error(capsys, ["train", "--config", str(cfg), "--out", out, "--resume", "--preset", "small",
                               "--no-progress"])
    assert "--preset tiny" in line


# ---- data ---------------------------------------------------------------------------------------

LATIN1 = "Caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e.".encode("latin-1")


@pytest.mark.parametrize("name, data, where", [
    ("binary.txt", bytes(range(256)) * 4, r"binary\.txt: not UTF-8 text \(byte 0x80 at offset 128\)"),
    ("nul.txt", b"text\x00\x01\x02", r"nul\.txt: contains NUL bytes"),
    ("latin1.md", LATIN1, r"latin1\.md: not UTF-8 text \(byte 0xe9 at offset 3\).*Latin-1"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "' + LATIN1 + b'"}\n', r"latin1\.jsonl:2: not UTF-8"),
])
def test_text_that_is_not_utf8_names_the_file(name, data, where, tmp_path, capsys):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=where):
        load_documents(tmp_path / name)
    line = _cli_error(capsys, ["train", "--preset", "tiny", "--out", str(tmp_path / "run"),
                               "--data", str(tmp_path / name), "--no-progress"])
    assert name in line


def test_parquet_file_that_is_not_parquet_names_the_file(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1" + bytes(100))
    with pytest.raises(ValueError, match=r"rows\.parquet: not a readable parquet file"):
        load_documents(tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match=r"rows\.parquet: not a readable parquet file"):
        load_sft_rows(tmp_path / "rows.parquet")


def test_post_training_files_that_are_not_utf8_name_the_file_and_line(folders, tmp_path, capsys):
    bad = tmp_path / "rows.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "' + LATIN1 + b'", "completion": "x"}\n')
    for argv in (["sft", "--init", folders["single"], "--seq-len", "64"], ["grpo", "--init", folders["single"]]):
        line = _cli_error(capsys, argv + ["--data", str(bad), "--out", str(tmp_path / argv[0]), "--no-progress"])
        assert "rows.jsonl:2: not UTF-8" in line


def test_sft_row_with_an_unknown_role_names_the_row(folders, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}]}]
    write_rows(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ValueError, match=r"sft\.jsonl: row 2: message 0 has role 'robot'"):
        load_sft_rows(tmp_path / "sft.jsonl")
    line = _cli_error(capsys, ["sft", "--init", folders["single"], "--data", str(tmp_path / "sft.jsonl"),
                               "--seq-len", "64", "--out", str(tmp_path / "out"), "--no-progress"])
    assert "row 2" in line and "'robot'" in line


@pytest.mark.parametrize("meta, message", [
    ({"numbers": 5, "target": 10}, r"row 2 \(task 'countdown'\): its \"meta\" does not fit"),
    ({}, r"row 2 \(task 'countdown'\): its \"meta\" does not fit .*KeyError"),
    ("oops", r"row 2 \(task 'countdown'\) needs .* \"meta\" object; meta is str"),
])
def test_grpo_problem_with_malformed_meta_names_the_row(meta, message, folders, tmp_path, capsys):
    good, bad = (ex.to_dict() for ex in task_examples(["countdown"], "train", 2, seed=0))
    write_rows(tmp_path / "problems.jsonl", [good, {**bad, "meta": meta}])
    with pytest.raises(ValueError, match=message):
        load_problems(tmp_path / "problems.jsonl")
    line = _cli_error(capsys, ["grpo", "--init", folders["single"], "--data", str(tmp_path / "problems.jsonl"),
                               "--out", str(tmp_path / "out"), "--no-progress"])
    assert "problems.jsonl: row 2" in line


@pytest.mark.parametrize("docs, val_fraction, message", [
    (["just one document"], 0.05, r"TrainConfig\.val_fraction=0\.05 holds out none of the 1 document"),
    ([f"document {i}" for i in range(40)], 0.0, r"TrainConfig\.val_fraction is 0"),
])
def test_empty_validation_split_is_an_error_naming_val_fraction(docs, val_fraction, message, tmp_path):
    write_rows(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    cfg = TrainConfig(**{**TINY, "data": [str(tmp_path / "docs.jsonl")], "val_fraction": val_fraction,
                         "vocab_size": 300, "seq_len": 8, "batch_size": 1})
    with pytest.raises(ValueError, match=message):
        prepare_data(cfg)


# ---- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["demo", "--preset", "tiny", "--batch", "0"], "--batch must be >= 1 (got 0)"),
    (["demo", "--preset", "tiny", "--batch", "-1"], "--batch must be >= 1 (got -1)"),
    (["demo", "--preset", "tiny", "--prompt-len", "0"], "--prompt-len must be >= 1 (got 0)"),
    (["demo", "--preset", "tiny", "--prompt-len", "300"], "exceed the 'tiny' preset's max_position_embeddings"),
    (["generate", "{model}", "--prompt", "x", "--device", "bogus"], "--device 'bogus' is not a torch device"),
    (["generate", "{model}", "--prompt", "x", "--max-num-seqs", "0"], "--max-num-seqs must be >= 1 (got 0)"),
    (["generate", "{model}", "--prompt", "x", "--max-tokens", "0"], "--max-tokens must be >= 1 (got 0)"),
    (["chat", "{model}", "--max-model-len", "0"], "--max-model-len must be >= 1 (got 0)"),
    (["serve", "{model}", "--port", "-1"], "--port must be in 0..65535 (got -1)"),
    (["serve", "{model}", "--port", "70000"], "--port must be in 0..65535 (got 70000)"),
    (["sample", "--model", "{model}", "--out", "{tmp}/s.jsonl", "--n", "0"], "--n must be >= 1 (got 0)"),
    (["sample", "--model", "{model}", "--out", "{tmp}", "--n", "1"], "is a folder; it must name the .jsonl file"),
    (["eval", "--model", "{model}", "--n", "0"], "--n must be >= 1 (got 0)"),
    (["eval", "--model", "{model}", "--k", "0"], "EvalConfig.k must be a positive int (got 0)"),
    (["train", "--preset", "tiny", "--out", "{tmp}/run", "--seed", "-1"], "TrainConfig.seed must be an int >= 0"),
    (["train", "--preset", "tiny", "--out", "{tmp}/file"], "--out {tmp}/file is an existing file"),
    (["demo", "--preset", "tiny", "--out", "{tmp}/file"], "--out {tmp}/file is an existing file"),
    (["sft", "--init", "{model}", "--out", "{tmp}/file"], "--out {tmp}/file is an existing file"),
])
def test_bad_flag_is_one_error_naming_it(argv, message, folders, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    fill = {"model": folders["single"], "tmp": str(tmp_path)}
    line = _cli_error(capsys, [a.format(**fill) for a in argv])
    assert message.format(**fill) in line, line
    assert not os.path.exists(tmp_path / "run"), "a flag error must come before any output is written"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_names_the_flag(folders, capsys):
    line = _cli_error(capsys, ["generate", folders["single"], "--prompt", "x", "--device", "cuda"])
    assert "--device cuda" in line and "no CUDA GPU" in line
