"""ModelConfig: presets, parameter counts against the published figures (docs/design/checkpoints.md), HF config
mapping and validation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import nanoseek
from nanoseek import ConfigError, ModelConfig

# The HF-hub config.json of deepseek-ai/DeepSeek-V3 (rope_scaling with `type`); docs/design/checkpoints.md.
V3_HUB_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}

# DeepSeek-V2-Lite's HF-hub config.json (no num_nextn_predict_layers: V2 has no MTP).
V2_LITE_HUB_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
    "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    "aux_loss_alpha": 0.001, "seq_aux": True, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "rms_norm_eps": 1e-6, "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False,
    "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
    "pretraining_tp": 1, "torch_dtype": "bfloat16",
}


# ---- presets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "small"])
def test_small_presets_build_and_run(name):
    cfg = ModelConfig.preset(name)
    model = nanoseek.build_model(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert len(model.mtp) == cfg.num_nextn_predict_layers
    assert len(model.moe_layers()) == cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers


def test_small_preset_is_about_ten_million_parameters():
    model = nanoseek.build_model(ModelConfig.preset("small"), device="meta")
    assert 8e6 < model.num_parameters() < 12e6


def test_preset_overrides_and_unknown_preset():
    cfg = ModelConfig.preset("tiny", num_hidden_layers=5, q_lora_rank=None)
    assert cfg.num_hidden_layers == 5 and cfg.q_lora_rank is None
    with pytest.raises(ConfigError, match="no-such-model"):
        ModelConfig.preset("no-such-model")
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.preset("tiny", num_experts_per_tok=99)


@pytest.fixture(scope="module")
def v3_meta():
    return nanoseek.build_model(ModelConfig.preset("v3-671b"), device="meta")


def test_v3_671b_parameter_counts(v3_meta):
    """docs/design/checkpoints.md, "Reference parameter counts": main model 671,026,419,200; activated
    37,552,297,472 including the input embedding (36,625,618,432 without it). `num_parameters(activated=True)`
    keeps the embedding and the head and drops the 248 unchosen routed experts of each of the 58 MoE layers."""
    cfg = v3_meta.cfg
    assert next(v3_meta.parameters()).device.type == "meta"
    assert v3_meta.num_parameters() == 671_026_419_200
    activated = v3_meta.num_parameters(activated=True)
    assert activated == 37_552_297_472
    assert activated - cfg.vocab_size * cfg.hidden_size == 36_625_618_432
    # the MTP module (excluded from both counts) holds 11,610,068,224 values of its own (same note)
    mtp = sum(t.numel() for n, t in v3_meta.state_dict().items() if n.startswith("mtp."))
    assert mtp == 11_610_068_224


def test_v3_671b_structure(v3_meta):
    cfg = v3_meta.cfg
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert len(v3_meta.moe_layers()) == 58 + 1  # 58 main MoE layers + the MTP block
    attn = v3_meta.model.layers[0].self_attn
    assert tuple(attn.q_b_proj.weight.shape) == (24576, 1536)
    assert tuple(attn.kv_a_proj_with_mqa.weight.shape) == (576, 7168)
    assert tuple(attn.kv_b_proj.weight.shape) == (32768, 512)
    assert tuple(attn.o_proj.weight.shape) == (7168, 16384)
    experts = v3_meta.model.layers[3].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (256, 4096, 7168)
    assert tuple(experts.down_proj.shape) == (256, 7168, 2048)
    assert tuple(v3_meta.mtp[0].eh_proj.weight.shape) == (7168, 14336)


def test_v2_lite_parameter_counts():
    """docs/design/checkpoints.md: 15.706B total, 2.45B activated excluding the input embedding."""
    cfg = ModelConfig.preset("v2-lite")
    model = nanoseek.build_model(cfg, device="meta")
    assert len(model.mtp) == 0
    assert round(model.num_parameters() / 1e9, 3) == 15.706
    activated = model.num_parameters(activated=True) - cfg.vocab_size * cfg.hidden_size
    assert round(activated / 1e9, 2) == 2.45


def test_softmax_scale_matches_spec():
    """docs/design/mla.md, "Softmax scale": 192^-0.5 * (0.1 * mscale_all_dim * ln 40 + 1)^2."""
    assert ModelConfig.preset("v3-671b").softmax_scale == pytest.approx(0.1352338, abs=1e-6)
    assert ModelConfig.preset("v2-lite").softmax_scale == pytest.approx(0.1147214, abs=1e-6)
    plain = ModelConfig.preset("tiny", rope_scaling=None)
    assert plain.softmax_scale == pytest.approx(plain.qk_head_dim ** -0.5, rel=1e-12)


def test_kv_cache_bytes_of_v3_match_spec():
    """docs/design/mla.md, "What the cache holds": 70,272 bytes/token in BF16 for MLA vs 4,997,120 for the
    expanded K/V."""
    cfg = ModelConfig.preset("v3-671b")
    assert cfg.kv_cache_bytes_per_token(2) == 70_272
    assert cfg.mha_cache_bytes_per_token(2) == 4_997_120
    assert nanoseek.LatentCache.bytes_per_token(cfg, torch.bfloat16) == 70_272


# ---- HF config mapping --------------------------------------------------------------------------------

def _dense_config():
    return ModelConfig(n_routed_experts=0, first_k_dense_replace=0)


@pytest.mark.parametrize("make", [lambda: ModelConfig.preset("tiny"), lambda: ModelConfig.preset("small"),
                                  lambda: ModelConfig.preset("v3-671b"), lambda: ModelConfig.preset("v2-lite"),
                                  lambda: ModelConfig.preset("tiny", rope_scaling=None, q_lora_rank=None),
                                  _dense_config],
                         ids=["tiny", "small", "v3-671b", "v2-lite", "tiny-plain", "dense"])
def test_to_hf_from_hf_round_trip(make):
    cfg = make()
    hf = cfg.to_hf()
    json.dumps(hf)  # config.json material
    assert hf["num_key_value_heads"] == cfg.num_attention_heads
    back = ModelConfig.from_hf(json.loads(json.dumps(hf)))
    diff = {f.name: (getattr(back, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if getattr(back, f.name) != getattr(cfg, f.name)}
    assert not diff, f"fields changed by to_hf -> from_hf: {diff}"


def test_from_hf_reads_a_file_and_a_folder(tmp_path):
    cfg = ModelConfig.preset("tiny", hidden_size=96)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    assert ModelConfig.from_hf(tmp_path) == cfg
    assert ModelConfig.from_hf(tmp_path / "config.json") == cfg
    assert ModelConfig.from_hf(str(tmp_path)) == cfg
    with pytest.raises(ConfigError):
        ModelConfig.from_hf(tmp_path / "missing")


def test_from_hf_on_the_v3_hub_config():
    cfg = ModelConfig.from_hf(V3_HUB_CONFIG)
    # the hub config differs from the preset only in the init std (0.02 vs the report's 0.006; checkpoints.md)
    assert cfg == ModelConfig.preset("v3-671b", initializer_range=0.02)
    rs = cfg.rope_scaling
    assert (rs["factor"], rs["original_max_position_embeddings"], rs["mscale_all_dim"]) == (40, 4096, 1.0)
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-6)


def test_from_hf_on_the_v2_lite_hub_config():
    cfg = ModelConfig.from_hf(V2_LITE_HUB_CONFIG)
    assert cfg.q_lora_rank is None
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("softmax", "greedy", False)
    assert cfg.softmax_scale == pytest.approx(0.1147214, abs=1e-6)
    assert cfg.num_nextn_predict_layers == 0, "DeepSeek-V2 has no MTP module"
    assert cfg == ModelConfig.preset("v2-lite", initializer_range=0.02)


def test_from_hf_accepts_rope_parameters_style():
    """transformers >= 5 writes `rope_parameters` (with rope_theta inside) instead of `rope_scaling`."""
    hf = ModelConfig.preset("tiny").to_hf()
    hf.pop("rope_scaling")
    hf.pop("rope_theta")
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0,
                             "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
                             "mscale": 0.707, "mscale_all_dim": 0.707}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 50000.0
    rs = cfg.rope_scaling
    assert (rs["factor"], rs["original_max_position_embeddings"], rs["beta_fast"], rs["beta_slow"]) == (8.0, 32, 16, 2)
    assert "rope_theta" not in rs
    m = 0.1 * 0.707 * math.log(8.0) + 1
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5 * m * m, rel=1e-12)

    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 20000.0}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_scaling is None and cfg.rope_theta == 20000.0


def test_yarn_factor_defaults_to_the_context_extension():
    cfg = ModelConfig.preset("tiny", max_position_embeddings=512,
                             rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 128})
    assert cfg.rope_scaling["factor"] == 4.0


@pytest.mark.parametrize("value", [None, 0])
def test_q_lora_rank_null_or_zero_means_no_query_latent(value):
    hf = ModelConfig.preset("tiny").to_hf()
    hf["q_lora_rank"] = value
    cfg = ModelConfig.from_hf(hf)
    assert cfg.q_lora_rank is None
    assert ModelConfig.preset("tiny", q_lora_rank=value).q_lora_rank is None
    attn = nanoseek.build_model(cfg, seed=0).model.layers[0].self_attn
    assert hasattr(attn, "q_proj") and not hasattr(attn, "q_a_proj")
    assert tuple(attn.q_proj.weight.shape) == (cfg.num_attention_heads * cfg.qk_head_dim, cfg.hidden_size)


def test_from_hf_v2_defaults():
    """A V2 config that omits the routing keys gets V2's semantics (softmax, greedy, no renormalization,
    scale 1.0), null groups become 1, and no MTP (V2 has none)."""
    hf = {k: v for k, v in V2_LITE_HUB_CONFIG.items()
          if k not in ("scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor")}
    hf["n_group"] = hf["topk_group"] = None
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob, cfg.routed_scaling_factor) == \
        ("softmax", "greedy", False, 1.0)
    assert (cfg.n_group, cfg.topk_group) == (1, 1)
    assert cfg.num_nextn_predict_layers == 0


def test_from_hf_takes_the_first_eos_of_a_list():
    hf = ModelConfig.preset("tiny").to_hf()
    hf["eos_token_id"] = [7, 8]
    assert ModelConfig.from_hf(hf).eos_token_id == 7


def test_from_hf_rejects_other_model_types():
    hf = ModelConfig.preset("tiny").to_hf()
    hf["model_type"] = "llama"
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf(hf)


# ---- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, overrides", [
    ("n_group", dict(n_routed_experts=8, n_group=3)),
    ("topk_group", dict(n_group=4, topk_group=5)),
    ("num_experts_per_tok", dict(n_routed_experts=8, num_experts_per_tok=9)),
    ("num_experts_per_tok", dict(num_experts_per_tok=0)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=7)),
    ("scoring_func", dict(scoring_func="relu")),
    ("topk_method", dict(topk_method="random")),
    ("rope_scaling", dict(rope_scaling={"type": "linear", "factor": 2.0})),
    ("rope_scaling", dict(rope_scaling={"rope_type": "linear", "factor": 2.0,
                                        "original_max_position_embeddings": 64})),
    ("rope_scaling", dict(rope_scaling={"type": "yarn", "factor": 2.0})),  # no original_max_position_embeddings
    ("rope_scaling", dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64})),
    ("hidden_size", dict(hidden_size=0)),
    ("vocab_size", dict(vocab_size=-3)),
    ("q_lora_rank", dict(q_lora_rank=-1)),
    ("model_type", dict(model_type="deepseek_v4")),
    ("rms_norm_eps", dict(rms_norm_eps=0.0)),
    ("routed_scaling_factor", dict(routed_scaling_factor=0.0)),
    ("topk_group", dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3)),
    ("n_group", dict(n_routed_experts=4, n_group=4, topk_group=2, num_experts_per_tok=2)),  # noaux_tc top-2
])
def test_invalid_config_raises_config_error_naming_the_field(field, overrides):
    with pytest.raises(ConfigError) as info:
        ModelConfig.preset("tiny", **overrides)
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_invalid_hf_config_raises_config_error():
    hf = dict(V3_HUB_CONFIG, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_hf(hf)
    hf = dict(V3_HUB_CONFIG, topk_group=9)
    with pytest.raises(ConfigError, match="topk_group"):
        ModelConfig.from_hf(hf)


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        ModelConfig.preset("tiny").replace(qk_rope_head_dim=5)
