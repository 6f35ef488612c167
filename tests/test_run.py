"""The training-run layer's seams: meta-device construction, name-keyed optimizer state, the expert-bias update
from all-reduced counts (two gloo processes), and the shared config validation."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.config import ConfigError
from nanoseek.model import Transformer
from nanoseek.train import TrainConfig
from nanoseek.train.balance import ExpertLoad
from nanoseek.train.run import TrainingRun
from nanoseek.train.state import list_checkpoints


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters, buffers (persistent or not) and the rotary table."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers()), "rotary": model.rotary.inv_freq}


def test_meta_built_model_materialises_to_the_directly_built_one(monkeypatch):
    cfg = nanoseek.ModelConfig.preset("tiny")
    meta = nanoseek.build_model(cfg, device="meta")
    assert all(t.is_meta for t in meta.parameters())
    torch.manual_seed(3)
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*meta.parameters(), *meta.buffers()]:      # whatever the memory held: init_weights rewrites it
            t.fill_(float("nan") if t.is_floating_point() else 7)
        meta.rotary.inv_freq = torch.full_like(meta.rotary.inv_freq, float("nan"))
    meta.init_weights()

    # built in place: the nn modules draw their default init while being constructed, then init_weights
    # (without repeating those draws, which materialising has to make itself) draws N(0, std)
    torch.manual_seed(3)
    direct = Transformer(cfg)
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    monkeypatch.setattr(torch.nn.Embedding, "reset_parameters", lambda self: None)
    direct.init_weights()
    monkeypatch.undo()

    got, want = _tensors(meta), _tensors(direct)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert all(int(moe.tokens_per_expert.sum()) == 0 for _, moe in meta.moe_layers())
    assert torch.equal(nanoseek.build_model(cfg, seed=3).lm_head.weight, direct.lm_head.weight)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(meta(ids), direct(ids), rtol=0, atol=0)


def _tiny_run(tmp_path, **kw) -> tuple[TrainingRun, torch.nn.Module]:
    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny", num_nextn_predict_layers=0), seed=0)
    run = TrainingRun(tmp_path, seed=0, progress=False, tensorboard=False, **kw)
    tok = type("Tok", (), {"save": lambda self, path: None})()
    run.attach(model, tok, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0)
    return run, model


def _one_update(run, model, seed):
    ids = torch.randint(0, model.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    run.accumulate([ids], lambda b: (model(b).float().logsumexp(-1).mean(), {}))
    run.optimizer_step(1e-2)


def test_optimizer_state_is_keyed_by_parameter_name_and_resumes_exactly(tmp_path):
    run, model = _tiny_run(tmp_path)
    _one_update(run, model, 0)
    run.step = 1
    path = run.save({"note": "mine"})
    tensors = load_file(os.path.join(path, "trainer_state", "optimizer.safetensors"))
    assert "model.layers.0.self_attn.o_proj.weight/exp_avg" in tensors
    meta = json.load(open(os.path.join(path, "trainer_state", "trainer_state.json")))
    assert meta["note"] == "mine" and meta["step"] == 1
    assert "model.embed_tokens.weight" in meta["optimizer"]["param_groups"][0]["params"]

    resumed_run = TrainingRun(tmp_path, seed=0, progress=False, tensorboard=False, resume=True)
    assert resumed_run.checkpoint == path
    resumed = nanoseek.from_pretrained(path)
    tok = type("Tok", (), {"save": lambda self, p: None})()
    state = resumed_run.attach(resumed, tok, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0)
    assert state == {"note": "mine"} and resumed_run.step == 1
    for r, m in ((run, model), (resumed_run, resumed)):
        _one_update(r, m, 1)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_optimizer_state_written_by_position_still_loads(tmp_path):
    """Checkpoints written before the state was keyed by name hold "<position>.<key>" tensors."""
    run, model = _tiny_run(tmp_path)
    _one_update(run, model, 0)
    path = run.save({})
    sd = run.optimizer.state_dict()
    state_dir = os.path.join(path, "trainer_state")
    save_file({f"{i}.{k}": v.contiguous() for i, s in sd["state"].items() for k, v in s.items()},
              os.path.join(state_dir, "optimizer.safetensors"))
    meta = json.load(open(os.path.join(state_dir, "trainer_state.json")))
    meta["optimizer"] = {"param_groups": sd["param_groups"]}
    json.dump(meta, open(os.path.join(state_dir, "trainer_state.json"), "w"))
    resumed_run = TrainingRun(tmp_path, seed=0, progress=False, tensorboard=False, resume=True)
    resumed = nanoseek.from_pretrained(path)
    resumed_run.attach(resumed, None, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0)
    state = {n: resumed_run.optimizer.state[p] for n, p in resumed.named_parameters()}
    for name, p in model.named_parameters():
        assert state[name].keys() == run.optimizer.state[p].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(state[name][k], run.optimizer.state[p][k]) for k in state[name]), name


def test_a_non_finite_loss_drops_the_step_and_too_many_abort(tmp_path):
    run, model = _tiny_run(tmp_path, max_bad_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = torch.randint(0, model.cfg.vocab_size, (1, 4))
    drawn = []

    def loss_fn(batch):
        drawn.append(batch)
        return (model(good).sum() * (float("nan") if batch == 1 else 1.0)), {"x": 1.0}

    assert run.accumulate(iter([0, 1, 2]), loss_fn) is None and drawn == [0, 1]   # micro-batch 2 never drawn
    assert all(p.grad is None for p in model.parameters()) and run.bad_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert run.accumulate([0, 2], loss_fn) == {"x": 2.0} and run.bad_steps == 0
    run.optimizer.zero_grad()
    run.accumulate([1], loss_fn)
    with pytest.raises(nanoseek.train.TrainingAborted, match="2 consecutive"):
        run.accumulate([1], loss_fn)


def _bias_worker(rank: int, port: int, result: dict):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny", num_nextn_predict_layers=0), seed=0)
        (_, moe), = model.moe_layers()
        # each replica saw different tokens: rank 0 overloads expert 0, rank 1 expert 1
        local = torch.tensor([[9, 1, 5, 5, 5, 5, 5, 5], [1, 9, 5, 5, 5, 5, 5, 5]])[rank]
        moe.tokens_per_expert.copy_(local)
        load = ExpertLoad(model.moe_layers(), gamma_at=lambda: 0.01)
        load.step()
        result[rank] = (moe.gate.e_score_correction_bias.clone(), load.counts["model.layers.1.mlp"].clone())
    finally:
        dist.destroy_process_group()


def test_bias_update_uses_counts_all_reduced_over_replicas():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.start_processes(_bias_worker, args=(port, result), nprocs=2, start_method="spawn", join=True)
        (bias0, counts0), (bias1, counts1) = result[0], result[1]
    assert torch.equal(counts0, torch.full((8,), 10.0)) and torch.equal(counts1, counts0)   # the sum, everywhere
    assert torch.equal(bias0, bias1) and torch.equal(bias0, torch.zeros(8))          # a balanced sum: no move
    # a replica alone would have moved its biases: what the all-reduce prevents
    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny", num_nextn_predict_layers=0), seed=0)
    (_, moe), = model.moe_layers()
    moe.tokens_per_expert.copy_(torch.tensor([9, 1, 5, 5, 5, 5, 5, 5]))
    ExpertLoad(model.moe_layers(), gamma_at=lambda: 0.01).step()
    assert moe.gate.e_score_correction_bias[0] < 0 < moe.gate.e_score_correction_bias[1]


def _compile_choice_worker(rank: int, port: int, out: str, result: dict):
    import nanoseek.machine as machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    probed = []
    # the decode probe (about 100 s) stands in as a profile in which compiling pays
    machine.decode_profile = lambda: probed.append(rank) or machine.DecodeProfile(
        cpu="test", threads=1, torch="test", eager_ms=10.0, compiled_ms=5.0, compile_s=1.0)
    run = TrainingRun(out, seed=0, progress=False, tensorboard=False, replicate=True)
    try:
        result[rank] = (run.resolve_compile_rollouts("auto", 10_000), run.resolve_compile_rollouts(False, 10_000),
                        probed)
    finally:
        dist.destroy_process_group()


def test_rank_zero_alone_takes_the_decode_probe_and_every_rank_follows_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.start_processes(_compile_choice_worker, args=(port, str(tmp_path), result), nprocs=2,
                           start_method="spawn", join=True)
        assert result[0] == (True, False, [0]) and result[1] == (True, False, [])


def test_rank_zero_alone_writes_the_checkpoint(tmp_path, monkeypatch):
    import nanoseek.train.state as state
    run, model = _tiny_run(tmp_path)
    monkeypatch.setattr(state, "is_main_process", lambda: False)
    run.save({})
    assert not list_checkpoints(run.ckpt_dir) and not os.path.exists(run.ckpt_dir)
    monkeypatch.undo()
    run.save({})
    assert len(list_checkpoints(run.ckpt_dir)) == 1


@pytest.mark.parametrize("field, value, message", [
    ("seed", -1, r"TrainConfig\.seed must be an int >= 0 \(got -1\)"),
    ("lr", float("nan"), r"TrainConfig\.lr must be a finite number > 0 \(got nan\)"),
    ("beta2", 1.0, r"TrainConfig\.beta2 must be in \[0, 1\) \(got 1\.0\)"),
    ("batch_size", True, r"TrainConfig\.batch_size must be a positive int \(got True\)"),
    ("precision", "fp16", r"TrainConfig\.precision must be one of \('auto', 'float32', 'bf16', 'fp8'\) \(got 'fp16'\)"),
])
def test_config_errors_name_the_field_the_rule_and_the_value(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_the_model_package_imports_no_upper_layer_and_no_torch_distributed():
    import ast
    import pathlib
    model_dir = pathlib.Path(nanoseek.__file__).parent / "model"
    for path in model_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                relative = isinstance(node, ast.ImportFrom) and node.level >= 2     # from ..x import
                for name in names:
                    assert not name.startswith("torch.distributed"), f"{path.name} imports {name}"
                    assert not relative or name == "config", f"{path.name} imports ..{name}"
