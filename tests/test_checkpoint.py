"""HF-format checkpoints: round trips, sharding, FP8 blocks, MTP copies and precise load errors."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError
from nanoseek.checkpoint import save_pretrained
from nanoseek.fp8 import block_dequantize, block_quantize

E4M3_MAX = 448.0


def _ids(cfg, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, seq), generator=g)


def _assert_same_model(a: nanoseek.Transformer, b: nanoseek.Transformer) -> None:
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = _ids(a.cfg)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
        ha, hb = a.hidden_states(ids), b.hidden_states(ids)
        for x, y in zip(a.mtp_hidden_states(ha, ids), b.mtp_hidden_states(hb, ids)):
            assert torch.equal(x, y)


def _only_safetensors_and_json(folder) -> list[str]:
    files = sorted(os.listdir(folder))
    assert files and all(f.endswith((".safetensors", ".json")) for f in files), files
    return files


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    """The perturbed tiny model (with MTP) saved once, single-file."""
    path = tmp_path_factory.mktemp("saved")
    nanoseek.save_pretrained(tiny_model, path)
    return path


# ---- round trips -------------------------------------------------------------------------------------

def test_round_trip_single_file(tiny_model, saved):
    assert _only_safetensors_and_json(saved) == ["config.json", "model.safetensors"]
    back = nanoseek.from_pretrained(saved)
    assert len(back.mtp) == tiny_model.cfg.num_nextn_predict_layers == 1
    assert not back.training
    _assert_same_model(tiny_model, back)


def test_round_trip_sharded(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path, max_shard_bytes=50_000)
    files = _only_safetensors_and_json(tmp_path)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors" not in shards
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    stored = {}
    for shard in shards:
        tensors = load_file(tmp_path / shard)
        assert not set(tensors) & set(stored), "a tensor is stored twice"
        stored.update({k: shard for k in tensors})
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 50_000 or len(tensors) == 1
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(tmp_path / s).values())
    _assert_same_model(tiny_model, nanoseek.from_pretrained(tmp_path))


def test_resaving_into_the_same_folder_leaves_no_stale_files(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path, max_shard_bytes=50_000)
    nanoseek.save_pretrained(tiny_model, tmp_path)
    assert _only_safetensors_and_json(tmp_path) == ["config.json", "model.safetensors"]
    _assert_same_model(tiny_model, nanoseek.from_pretrained(tmp_path))
    save_pretrained(tiny_model, tmp_path, max_shard_bytes=50_000)
    assert "model.safetensors" not in os.listdir(tmp_path)
    _assert_same_model(tiny_model, nanoseek.from_pretrained(tmp_path))


def test_round_trip_bf16(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    nanoseek.save_pretrained(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    back = nanoseek.from_pretrained(tmp_path)  # dtype from config.json
    assert back.lm_head.weight.dtype == torch.bfloat16
    for _, moe in back.moe_layers():
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
    sa, sb = model.state_dict(), back.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = _ids(model.cfg)
    with torch.no_grad():
        a, b = model(ids), back(ids)
    assert torch.equal(a, b), f"the reloaded bf16 model differs by up to {(a.float() - b.float()).abs().max():.3g}"
    # an explicit dtype wins over config.json
    assert nanoseek.from_pretrained(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_mtp_layer_and_its_copies_are_written(tiny_model, saved):
    tensors = load_file(saved / "model.safetensors")
    L = tiny_model.cfg.num_hidden_layers
    prefix = f"model.layers.{L}."
    assert torch.equal(tensors[prefix + "embed_tokens.weight"], tiny_model.model.embed_tokens.weight)
    assert torch.equal(tensors[prefix + "shared_head.head.weight"], tiny_model.lm_head.weight)
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "self_attn.kv_b_proj.weight", "mlp.gate.e_score_correction_bias",
                 "mlp.experts.0.gate_proj.weight", "mlp.experts.7.down_proj.weight"):
        assert prefix + name in tensors, name
    assert not any(k.startswith("mtp.") for k in tensors)
    assert f"model.layers.{L + 1}.enorm.weight" not in tensors
    # experts are stored per expert, HF style
    gate_up = tiny_model.model.layers[1].mlp.experts.gate_up_proj
    I = tiny_model.cfg.moe_intermediate_size
    assert torch.equal(tensors["model.layers.1.mlp.experts.3.gate_proj.weight"], gate_up[3, :I])
    assert torch.equal(tensors["model.layers.1.mlp.experts.3.up_proj.weight"], gate_up[3, I:])


def test_declared_mtp_without_mtp_tensors_warns_and_loads_without_mtp(tiny_model, saved, copy_dir):
    path = copy_dir(saved)
    L = tiny_model.cfg.num_hidden_layers
    tensors = load_file(os.path.join(path, "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith(f"model.layers.{L}.")},
              os.path.join(path, "model.safetensors"))
    with pytest.warns(UserWarning, match="MTP"):
        model = nanoseek.from_pretrained(path)
    assert len(model.mtp) == 0 and model.cfg.num_nextn_predict_layers == 0
    assert not any(n.startswith("mtp.") for n in model.state_dict())
    ids = _ids(model.cfg)
    with torch.no_grad():
        assert torch.equal(model(ids), tiny_model(ids))


def test_load_mtp_false_skips_the_mtp_layer(tiny_model, saved):
    model = nanoseek.from_pretrained(saved, load_mtp=False)
    assert len(model.mtp) == 0
    ids = _ids(model.cfg)
    with torch.no_grad():
        assert torch.equal(model(ids), tiny_model(ids))


# ---- FP8 blocks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, grid", [((200, 300), (2, 3)), ((576, 7168), (5, 56)), ((128, 128), (1, 1)),
                                          ((1, 129), (1, 2)), ((257, 5), (3, 1))])
def test_block_quantize_scale_grid(shape, grid):
    w = torch.randn(shape) * 0.02
    q, scale_inv = block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == grid
    assert grid == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))


def test_block_quantize_error_is_bounded_per_block():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g) * 0.05
    w[:128, 128:256] *= 100  # blocks with very different ranges
    w[130, 7] = 3.0  # an outlier in block (1, 0)
    q, scale_inv = block_quantize(w)
    deq = block_dequantize(q, scale_inv)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    # each block's scale is its own amax / 448
    for i in range(2):
        for j in range(3):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert scale_inv[i, j].item() == pytest.approx(block.abs().max().item() / E4M3_MAX, rel=1e-6)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4, plus half a subnormal step (2^-10 * scale)
    scale = scale_inv.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert ((deq - w).abs() <= w.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-12).all()
    assert (deq - w).norm() / w.norm() < 0.04
    # the element of largest magnitude of each block maps to +-448 and comes back to fp32 precision
    assert deq[130, 7].item() == pytest.approx(3.0, rel=1e-6)
    # the outlier leaves the other blocks alone
    w2 = w.clone()
    w2[130, 7] = 0.0
    deq2 = block_dequantize(*block_quantize(w2))
    assert torch.equal(deq2[:128], deq[:128]) and torch.equal(deq2[128:, 128:], deq[128:, 128:])


def test_block_quantize_zero_weight_and_bad_inputs():
    q, s = block_quantize(torch.zeros(130, 10))
    assert torch.equal(block_dequantize(q, s), torch.zeros(130, 10))
    with pytest.raises(ValueError):
        block_quantize(torch.zeros(4, 4, 4))
    q, s = block_quantize(torch.randn(200, 300))
    with pytest.raises(ValueError, match="scale_inv"):
        block_dequantize(q, s[:, :2])
    assert block_dequantize(q, s, dtype=torch.bfloat16).dtype == torch.bfloat16


_FP8_MODULES = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
                "up_proj", "down_proj"}


def test_fp8_save_quantizes_what_the_released_checkpoints_quantize(tiny_model, tmp_path):
    """docs/design/checkpoints.md, "Tensor inventory": every attention, dense-MLP, expert and shared-expert
    projection (the MTP block's too) is FP8 with a block scale; embeddings, head, norms, router, bias, eh_proj
    and the MTP copies are not."""
    save_pretrained(tiny_model, tmp_path, fp8=True)
    _only_safetensors_and_json(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    weights = {k: v for k, v in tensors.items() if not k.endswith("_scale_inv")}
    expected = {k for k in weights if k.endswith(".weight") and k.split(".")[-2] in _FP8_MODULES}
    quantized = {k for k, v in weights.items() if v.dtype == torch.float8_e4m3fn}
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in expected
    assert not quantized - expected, f"quantized but should not be: {sorted(quantized - expected)}"
    assert not expected - quantized, f"not quantized: {sorted(expected - quantized)}"
    assert {k[: -len("_scale_inv")] for k in tensors if k.endswith("_scale_inv")} == quantized


def test_fp8_round_trip(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path, fp8=True)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "fp8"
    tensors = load_file(tmp_path / "model.safetensors")
    back = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    assert back.lm_head.weight.dtype == torch.float32
    params = dict(back.named_parameters())
    for name in ("model.layers.0.self_attn.q_b_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        if tensors[name].dtype == torch.float8_e4m3fn:
            expected = block_dequantize(tensors[name], tensors[name + "_scale_inv"])
            assert torch.equal(params[name], expected), name
            assert not torch.equal(params[name], tiny_model.get_parameter(name)), "FP8 should lose precision"
    # experts: stacked back from the per-expert FP8 tensors
    E_up = back.model.layers[1].mlp.experts.gate_up_proj
    I = back.cfg.moe_intermediate_size
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    assert torch.equal(E_up[5, I:], block_dequantize(tensors[name], tensors[name + "_scale_inv"]))
    # unquantized tensors are exact
    assert torch.equal(back.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)
    # logits stay close for a model at its default init scale (the perturbed tiny model is chaotic on purpose)
    model = nanoseek.build_model(tiny_model.cfg, seed=5).eval()
    save_pretrained(model, tmp_path / "default_init", fp8=True)
    back = nanoseek.from_pretrained(tmp_path / "default_init", dtype=torch.float32)
    ids = _ids(model.cfg)
    with torch.no_grad():
        got, want = back(ids), model(ids)
    mean_rel = ((got - want).abs().mean() / want.abs().mean()).item()
    assert 0 < mean_rel < 0.06


# ---- load errors name the tensor ---------------------------------------------------------------------------

def _corrupt(path, change) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


def _set(name, value):
    return lambda t: t.__setitem__(name, value(t) if callable(value) else value)


_BAD = [
    ("missing", lambda t: t.pop("model.layers.0.self_attn.kv_b_proj.weight"),
     "model.layers.0.self_attn.kv_b_proj.weight"),
    ("missing norm", lambda t: t.pop("model.norm.weight"), "model.norm.weight"),
    ("missing MTP tensor", lambda t: t.pop("model.layers.2.eh_proj.weight"), "model.layers.2.eh_proj.weight"),
    ("missing expert", lambda t: t.pop("model.layers.1.mlp.experts.6.up_proj.weight"),
     "model.layers.1.mlp.experts.6.up_proj.weight"),
    ("unexpected", _set("model.layers.0.self_attn.rotary.weight", torch.zeros(3)),
     "model.layers.0.self_attn.rotary.weight"),
    ("unexpected expert", _set("model.layers.1.mlp.experts.8.gate_proj.weight", torch.zeros(32, 64)),
     "model.layers.1.mlp.experts.8.gate_proj.weight"),
    ("orphan scale", _set("model.layers.0.self_attn.k_proj.weight_scale_inv", torch.ones(1, 1)),
     "model.layers.0.self_attn.k_proj.weight_scale_inv"),
    ("mis-shaped", _set("model.layers.0.self_attn.q_b_proj.weight", torch.zeros(96, 31)),
     "model.layers.0.self_attn.q_b_proj.weight"),
    ("mis-shaped norm", _set("model.layers.1.post_attention_layernorm.weight", torch.ones(65)),
     "model.layers.1.post_attention_layernorm.weight"),
    ("mis-shaped head", _set("lm_head.weight", torch.zeros(511, 64)), "lm_head.weight"),
    ("mis-shaped bias", _set("model.layers.1.mlp.gate.e_score_correction_bias", torch.zeros(9)),
     "model.layers.1.mlp.gate.e_score_correction_bias"),
    ("fp8 without scale", _set("model.layers.0.self_attn.o_proj.weight",
                               lambda t: t["model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)),
     "model.layers.0.self_attn.o_proj.weight"),
    ("fp8 expert without scale", _set("model.layers.1.mlp.experts.2.down_proj.weight",
                                      lambda t: t["model.layers.1.mlp.experts.2.down_proj.weight"]
                                      .to(torch.float8_e4m3fn)),
     "model.layers.1.mlp.experts.2.down_proj.weight"),
]


@pytest.mark.parametrize("what, change, named", _BAD, ids=[case[0] for case in _BAD])
def test_bad_checkpoint_raises_checkpoint_error_naming_the_tensor(what, change, named, saved, copy_dir):
    path = copy_dir(saved)
    _corrupt(path, change)
    with pytest.raises(CheckpointError) as info:
        nanoseek.from_pretrained(path)
    assert named in str(info.value), f"{what}: {info.value}"


@pytest.mark.parametrize("expert, shape", [(3, (32, 60)), (0, (30, 64))], ids=["wrong-in-dim", "wrong-out-dim"])
def test_one_mis_shaped_expert_raises_checkpoint_error_naming_it(expert, shape, saved, copy_dir):
    name = f"model.layers.1.mlp.experts.{expert}.gate_proj.weight"
    path = copy_dir(saved)
    _corrupt(path, _set(name, torch.zeros(shape)))
    with pytest.raises(CheckpointError) as info:
        nanoseek.from_pretrained(path)
    assert name in str(info.value)


@pytest.mark.parametrize("mtp", [0, 1])
def test_layers_beyond_the_config_are_not_silently_dropped(mtp, make_model, tmp_path):
    """A 3-layer checkpoint whose config.json says 2 layers must not load as a truncated 2-layer model."""
    model = make_model(nanoseek.ModelConfig.preset("tiny", num_hidden_layers=3, num_nextn_predict_layers=0), seed=2)
    nanoseek.save_pretrained(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    hf["num_hidden_layers"] = 2
    hf["num_nextn_predict_layers"] = mtp
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\."):
        nanoseek.from_pretrained(tmp_path)


def test_fp8_scale_of_the_wrong_grid_raises_checkpoint_error(tiny_model, tmp_path, copy_dir):
    save_pretrained(tiny_model, tmp_path / "fp8", fp8=True)
    path = copy_dir(tmp_path / "fp8")
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    _corrupt(path, _set(name + "_scale_inv", torch.ones(2, 1)))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        nanoseek.from_pretrained(path)


def test_mis_shaped_mtp_copy_raises_checkpoint_error(saved, copy_dir):
    """The MTP layer's embed_tokens/shared_head.head copies are 'checked-then-dropped on load' (checkpoint.py)."""
    name = "model.layers.2.embed_tokens.weight"
    path = copy_dir(saved)
    _corrupt(path, _set(name, torch.zeros(5, 64)))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        nanoseek.from_pretrained(path)


def test_index_pointing_to_a_missing_shard_names_the_tensor(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path, max_shard_bytes=50_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    shard = weight_map["lm_head.weight"]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match="missing") as info:
        nanoseek.from_pretrained(tmp_path)
    in_shard = [name for name, file in weight_map.items() if file == shard]
    assert any(name in str(info.value) for name in in_shard), str(info.value)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError):
        nanoseek.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(nanoseek.ModelConfig.preset("tiny").to_hf()))
    with pytest.raises(CheckpointError, match="safetensors"):
        nanoseek.from_pretrained(tmp_path)


def test_no_pickle_is_ever_written(tiny_model, tmp_path):
    nanoseek.save_pretrained(tiny_model, tmp_path / "single")
    save_pretrained(tiny_model, tmp_path / "sharded", max_shard_bytes=50_000)
    save_pretrained(tiny_model, tmp_path / "fp8", fp8=True)
    for sub in ("single", "sharded", "fp8"):
        for f in _only_safetensors_and_json(tmp_path / sub):
            with open(tmp_path / sub / f, "rb") as fh:
                head = fh.read(2)
            assert head != b"\x80\x02" and not head.startswith(b"PK"), f"{sub}/{f} looks like a pickle/zip"
