"""Parity against HF transformers (no remote code) on tiny random checkpoints built here.

Every HF model is perturbed (weights N(0, 0.15), norms N(1, 0.1), non-zero router correction biases) so
that routing, YaRN and the norms all matter, then saved with HF `save_pretrained` and loaded with
`nanoseek.from_pretrained`. float32 logits must agree to ~1e-5 of the logit scale.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import ModelConfig
from nanoseek.infer import greedy_generate

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SEQ = 48  # > original_max_position_embeddings (32) of the parity configs: YaRN's interpolated band is used


def _ids(cfg: ModelConfig, batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


@torch.no_grad()
def _hf_logits(model, ids):
    return model(ids, attention_mask=torch.ones_like(ids)).logits


def _routing_is_nontrivial(model: nanoseek.Transformer, ids: torch.Tensor) -> None:
    """The case routes tokens to several experts per layer (training forwards count them in tokens_per_expert)."""
    with torch.no_grad():
        model.train()(ids)
    model.eval()
    for name, moe in model.moe_layers():
        used = int((moe.tokens_per_expert > 0).sum())
        assert used >= min(4, moe.n_experts), f"{name}: only {used} experts received tokens"


# ---- (a) V3 and (b) V2 logits --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["v3_mscale1", "v3_mscale0.707", "v3_mscale_mixed"])
def test_v3_logits_match_hf(name, hf_checkpoint, load_nanoseek, assert_rel_close):
    path, hf, cfg = hf_checkpoint(name)
    ns = load_nanoseek(path)
    assert ns.cfg == cfg, "the config written by transformers must map back to the config it was built from"
    assert ns.cfg.q_lora_rank is not None and ns.cfg.rope_scaling["factor"] > 1
    assert 1 < ns.cfg.topk_group < ns.cfg.n_group and ns.cfg.first_k_dense_replace == 1
    for (name_, moe), hf_layer in zip(ns.moe_layers(), hf.model.layers[cfg.first_k_dense_replace:]):
        bias = moe.gate.e_score_correction_bias
        assert bias.dtype == torch.float32 and bias.abs().min() > 0, f"{name_}: correction bias not loaded"
        torch.testing.assert_close(bias, hf_layer.mlp.gate.e_score_correction_bias, rtol=0, atol=0)
    ids = _ids(cfg)
    with torch.no_grad():
        got = ns(ids)
    assert_rel_close(got, _hf_logits(hf, ids), TOL, f"{name} logits")
    _routing_is_nontrivial(ns, ids)


def test_parity_case_is_sensitive_to_yarn(hf_checkpoint, load_nanoseek, rel_err):
    """The same weights without YaRN must miss the HF logits by far more than TOL (the check above has teeth)."""
    path, hf, cfg = hf_checkpoint("v3_mscale1")
    ns = load_nanoseek(path)
    plain = nanoseek.Transformer(cfg.replace(rope_scaling=None)).eval()
    plain.load_state_dict(ns.state_dict())
    ids = _ids(cfg)
    with torch.no_grad():
        assert rel_err(plain(ids), _hf_logits(hf, ids)) > 100 * TOL


def test_parity_case_is_sensitive_to_the_correction_bias(hf_checkpoint, load_nanoseek, rel_err):
    path, hf, cfg = hf_checkpoint("v3_mscale1")
    ns = load_nanoseek(path)
    for _, moe in ns.moe_layers():
        moe.gate.e_score_correction_bias.zero_()
    ids = _ids(cfg)
    with torch.no_grad():
        assert rel_err(ns(ids), _hf_logits(hf, ids)) > 100 * TOL


@pytest.mark.parametrize("name", ["v2_greedy", "v2_group_limited_greedy"])
def test_v2_logits_match_hf(name, hf_checkpoint, load_nanoseek, assert_rel_close):
    path, hf, cfg = hf_checkpoint(name)
    assert type(hf).__name__ == "DeepseekV2ForCausalLM"
    ns = load_nanoseek(path)
    assert ns.cfg.model_type == "deepseek_v2" and ns.cfg.q_lora_rank is None
    assert ns.cfg.scoring_func == "softmax" and ns.cfg.norm_topk_prob is False
    assert ns.cfg.topk_method == cfg.topk_method
    assert hasattr(ns.model.layers[0].self_attn, "q_proj")
    ids = _ids(cfg)
    with torch.no_grad():
        got = ns(ids)
    assert_rel_close(got, _hf_logits(hf, ids), TOL, f"{name} logits")
    _routing_is_nontrivial(ns, ids)


# ---- (c) FP8 checkpoints ---------------------------------------------------------------------------

def _dequantize_reference(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Block by block, written independently of nanoseek.fp8: W[r, c] = fp8[r, c] * scale_inv[r//128, c//128]."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].to(torch.float32) * scale_inv[i, j]
    return out


def _read_all(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, f)))
    return tensors


def test_fp8_checkpoint_matches_hf_on_dequantized_weights(hf_checkpoint, load_nanoseek, assert_rel_close, rel_err,
                                                         tmp_path):
    path, hf, cfg = hf_checkpoint("fp8")
    ns = load_nanoseek(path)
    fp8_dir = tmp_path / "fp8"
    nanoseek.checkpoint.save_pretrained(ns, fp8_dir, fp8=True)
    with open(fp8_dir / "config.json") as f:
        fp8_config = json.load(f)
    assert fp8_config["quantization_config"]["weight_block_size"] == [128, 128]

    tensors = _read_all(fp8_dir)
    reference, partial_blocks, big = {}, 0, 0
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            assert name[: -len("_scale_inv")] in tensors, f"{name} has no weight"
            continue
        if t.dtype != torch.float8_e4m3fn:
            assert name + "_scale_inv" not in tensors
            reference[name] = t
            continue
        scale = tensors[name + "_scale_inv"]
        r, c = t.shape
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (math.ceil(r / 128), math.ceil(c / 128)), name
        partial_blocks += bool(r % 128 or c % 128)
        big += r > 128 or c > 128
        reference[name] = _dequantize_reference(t, scale)
    assert partial_blocks >= 5 and big >= 5, "the case must exercise partial edge blocks of multi-block weights"

    ref_dir = tmp_path / "dequantized"
    ref_dir.mkdir()
    save_file(reference, ref_dir / "model.safetensors", metadata={"format": "pt"})
    with open(ref_dir / "config.json", "w") as f:
        json.dump({k: v for k, v in fp8_config.items() if k != "quantization_config"}, f)
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()

    ns_fp8 = load_nanoseek(fp8_dir)
    # nanoseek's dequantization equals the independent block-by-block one, edge blocks included
    for name in ("model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        torch.testing.assert_close(ns_fp8.get_parameter(name), reference[name], rtol=0, atol=0)
    ids = _ids(cfg, seq=40)
    with torch.no_grad():
        got = ns_fp8(ids)
    expected = _hf_logits(hf_ref, ids)
    assert_rel_close(got, expected, TOL, "fp8 logits vs HF on dequantized weights")
    # quantization really changed the model, so the reference is not just the original weights
    assert rel_err(_hf_logits(hf, ids), expected) > 100 * TOL


# ---- (d) export: nanoseek-written folders load in transformers ---------------------------------------

@pytest.fixture(scope="module")
def export_models(make_model, parity_config):
    v3 = make_model(ModelConfig.preset("tiny", num_nextn_predict_layers=1), seed=7)
    v2 = make_model(parity_config("v2_group_limited_greedy"), seed=8)
    return {"v3_with_mtp": v3, "v2": v2}


def _check_hf_load(folder, model: nanoseek.Transformer, assert_rel_close):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                                 attn_implementation="eager")
    cfg = model.cfg
    expected_cls = "DeepseekV3ForCausalLM" if cfg.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
    assert type(hf).__name__ == expected_cls
    assert not info["missing_keys"], f"HF found no weights for {sorted(info['missing_keys'])[:5]}"
    assert not info["mismatched_keys"]
    # HF has no MTP module: the only keys it may leave unused are the MTP layer's (model.layers.{L}.*)
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    stray = [k for k in info["unexpected_keys"] if not k.startswith(mtp_prefix)]
    assert not stray, f"HF did not use {stray[:5]}"
    assert len(hf.model.layers) == cfg.num_hidden_layers
    ids = _ids(cfg, seq=80 if cfg.max_position_embeddings >= 80 else cfg.max_position_embeddings, seed=3)
    with torch.no_grad():
        expected = model(ids)
        assert_rel_close(_hf_logits(hf.eval(), ids), expected, TOL, f"{expected_cls} on a nanoseek export")
    return info


@pytest.mark.parametrize("which", ["v3_with_mtp", "v2"])
def test_export_loads_in_transformers(which, export_models, tmp_path, assert_rel_close):
    model = export_models[which]
    nanoseek.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    _check_hf_load(tmp_path, model, assert_rel_close)
    if model.cfg.num_nextn_predict_layers:
        stored = load_file(tmp_path / "model.safetensors")
        mtp = {k for k in stored if k.startswith(f"model.layers.{model.cfg.num_hidden_layers}.")}
        assert mtp, "the MTP layer must be written"
        # transformers has no module for the MTP layer: it may report its keys as unexpected and ignores
        # them; _check_hf_load made sure nothing else went unused and that the logits still match


@pytest.mark.parametrize("which", ["v3_with_mtp", "v2"])
def test_sharded_export_loads_in_transformers_and_nanoseek(which, export_models, tmp_path, assert_rel_close,
                                                           load_nanoseek):
    model = export_models[which]
    nanoseek.save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and len(shards) > 2
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map.values()) == set(shards)
    _check_hf_load(tmp_path, model, assert_rel_close)
    back = load_nanoseek(tmp_path)
    assert back.cfg == model.cfg  # MTP included
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k
    ids = _ids(model.cfg, seq=24, seed=4)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


# ---- (e) cached greedy decoding vs HF generate ------------------------------------------------------

@pytest.mark.parametrize("name", ["v3_mscale1", "v2_group_limited_greedy"])
def test_greedy_generate_matches_hf_generate(name, hf_checkpoint, load_nanoseek):
    path, hf, cfg = hf_checkpoint(name)
    ns = load_nanoseek(path)
    prompt = _ids(cfg, batch=2, seq=8, seed=5)
    new = 40  # ends at position 47, past original_max_position_embeddings
    gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=0,
                                            eos_token_id=None, bos_token_id=None, pad_token_id=0)
    # transformers falls back to the model's own eos_token_id when the call's is None: switch it off so a
    # generated eos does not end HF's run early (greedy_generate has no eos here either)
    saved_eos = hf.generation_config.eos_token_id
    hf.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_cfg)
    finally:
        hf.generation_config.eos_token_id = saved_eos
    got = greedy_generate(ns, prompt, new)
    assert got.shape == (2, 8 + new) and expected.shape == got.shape
    assert torch.equal(got[:, :8], prompt)
    mismatch = (got != expected).nonzero()
    assert mismatch.numel() == 0, f"first divergence at (row, pos) {mismatch[0].tolist()}"
    assert len(set(got[:, 8:].flatten().tolist())) > 5, "degenerate continuation; the comparison would be weak"
