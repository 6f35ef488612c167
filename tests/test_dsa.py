"""DeepSeek Sparse Attention (V3.2): the lightning indexer, top-k attention in every path, the indexer key cache,
V3.2 checkpoints (HF parity, export, FP8), the training stages and continued training (docs/design/dsa.md).

Test models use 16 indexer heads and perturbed weights, so exact score ties (every head's ReLU at zero), whose
top-k order is implementation-defined, do not occur (`_topk_margin` checks it); index_topk is well below the
sequence lengths.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from nanoseek import LatentCache, ModelConfig
from nanoseek.config import ConfigError
from nanoseek.fp8 import block_dequantize
from nanoseek.infer import LLM, LLMEngine, SamplingParams, greedy_generate
from nanoseek.model import indexer as indexer_mod
from nanoseek.model import mla as mla_mod
from nanoseek.model.indexer import IndexerRecorder, apply_rope_half
from nanoseek.model.rope import apply_rope
from nanoseek.train import TrainConfig, Trainer
from nanoseek.train.dsa import indexer_kl_loss, prepare_step
from nanoseek.train.metrics import read_jsonl

TOL = 1e-5
SEQ = 48  # > original_max_position_embeddings (32) and 4x index_topk
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
INDEX = dict(index_n_heads=16, index_head_dim=16, index_topk=12)
DSA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
           first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=128, rope_scaling=YARN, **INDEX)


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**DSA, "rope_scaling": dict(YARN), **overrides})


def _ids(cfg, batch=2, seq=SEQ, seed=1):
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _fix_key_norm_bias(model, seed=0):
    """`perturb` draws every "*norm*" parameter around 1, the LayerNorm bias included: a key bias near 1 in every
    dimension would make all keys alike. Draw the indexer's key-norm biases around 0 instead."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("k_norm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def _topk_margin(model, ids) -> float:
    """The smallest gap, over layers and queries, between the k-th and (k+1)-th indexer score, relative to the
    largest score: comparisons of two implementations' selections need it far above float rounding."""
    gaps = []

    def hook(attn, args):
        x, cos, sin, pos = args[:4]
        q_in, _ = attn._inputs(x, cos, sin)
        logits = attn.indexer.logits(x, q_in, cos, sin, attn.indexer.keys(x, cos, sin),
                                     pos[:, None, :] <= pos[:, :, None])
        top = logits.topk(attn.indexer.topk + 1, dim=-1).values
        gap = top[..., -2] - top[..., -1]
        gaps.append((gap[torch.isfinite(gap)].min() / top[..., 0].abs().max()).item())

    handles = [layer.self_attn.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return min(gaps)


@pytest.fixture(scope="module")
def dsa_model(make_model):
    return _fix_key_norm_bias(make_model(_cfg(), seed=11), seed=11)


def _dense_twin(model, **overrides):
    """The same weights in a model whose index_topk covers every token (or with no indexer at all)."""
    twin = nanoseek.Transformer(model.cfg.replace(**overrides)).eval()
    state = model.state_dict()
    if twin.cfg.has_indexer:
        twin.load_state_dict(state)
    else:
        twin.load_state_dict({k: v for k, v in state.items() if ".indexer." not in k})
    return twin


# ---- configuration ------------------------------------------------------------------------------------------

def test_config_fields_follow_the_indexer_and_name_the_broken_rule():
    cfg = _cfg()
    assert cfg.has_indexer and cfg.model_type == "deepseek_v32"
    hf = cfg.to_hf()
    assert hf["architectures"] == ["DeepseekV32ForCausalLM"] and hf["index_topk"] == 12
    assert ModelConfig.from_hf(hf) == cfg
    for off in (0, None):   # 0/None: no indexer, a dense V3 model
        dense = cfg.replace(index_topk=off)
        assert not dense.has_indexer and dense.model_type == "deepseek_v3" and dense.index_n_heads is None
        assert "index_topk" not in dense.to_hf() and dense.to_hf()["architectures"] == ["DeepseekV3ForCausalLM"]
    # keys a deepseek_v32 config omits take V3.2's values
    v32 = ModelConfig.from_hf({"model_type": "deepseek_v32"})
    assert (v32.index_n_heads, v32.index_head_dim, v32.index_topk) == (64, 128, 2048)
    assert v32 == ModelConfig.preset("v3.2-671b", rope_scaling=None)   # a config without rope keys has no YaRN
    with pytest.raises(ConfigError, match="index_head_dim must be >= qk_rope_head_dim"):
        _cfg(index_head_dim=4)
    with pytest.raises(ConfigError, match="q_lora_rank must be set with an indexer"):
        _cfg(q_lora_rank=None)
    with pytest.raises(ConfigError, match="index_n_heads must be a positive int"):
        _cfg(index_n_heads=None)
    with pytest.raises(ConfigError, match="model_type must be deepseek_v32"):
        _cfg(model_type="deepseek_v2")


def test_cache_bytes_count_the_indexer_keys():
    v32, v3 = ModelConfig.preset("v3.2-671b"), ModelConfig.preset("v3-671b")
    assert v32.kv_cache_bytes_per_token(2) == v3.kv_cache_bytes_per_token(2) == 70_272
    assert v32.index_cache_bytes_per_token(2) == 128 * 61 * 2 and v3.index_cache_bytes_per_token(2) == 0
    assert LatentCache.bytes_per_token(v32, torch.bfloat16) == 70_272 + 15_616
    cfg = _cfg()
    cache = LatentCache(cfg, slots=3, max_len=20, with_mtp=False)
    assert cache.nbytes == 3 * 20 * LatentCache.bytes_per_token(cfg, torch.float32)


# ---- the indexer --------------------------------------------------------------------------------------------

def test_indexer_rope_is_half_split_not_interleaved():
    x = torch.randn(2, 5, 3, 8)
    angles = torch.arange(5.0)[None, :, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])
    cos, sin = angles.cos().expand(2, 5, 4), angles.sin().expand(2, 5, 4)
    got = apply_rope_half(x, cos, sin)
    c, s = cos[:, :, None], sin[:, :, None]
    expected = torch.cat([x[..., :4] * c - x[..., 4:] * s, x[..., 4:] * c + x[..., :4] * s], dim=-1)  # (x_j, x_j+4)
    torch.testing.assert_close(got, expected)
    assert (got - apply_rope(x, cos, sin)).abs().max() > 0.1   # MLA's interleaved pairing is another rotation


def test_topk_at_least_the_length_is_exactly_dense_mla(dsa_model):
    """index_topk >= every query's visible tokens: bit for bit the dense V3 model, in every path."""
    wide = _dense_twin(dsa_model, index_topk=SEQ)
    dense = _dense_twin(dsa_model, index_topk=None)
    ids = _ids(dsa_model.cfg)
    with torch.no_grad():
        assert torch.equal(wide(ids), dense(ids))
        assert torch.equal(wide(ids, absorb=True), dense(ids, absorb=True))
        assert torch.equal(greedy_generate(wide, ids[:, :8], 40), greedy_generate(dense, ids[:, :8], 40))
    assert torch.equal(wide(ids), dense(ids))   # with autograd
    assert not torch.equal(dsa_model(ids), dense(ids))


def test_every_query_attends_to_its_topk_visible_tokens(dsa_model):
    attn = dsa_model.model.layers[1].self_attn
    x = torch.randn(2, SEQ, dsa_model.cfg.hidden_size)
    pos = torch.arange(SEQ).expand(2, SEQ)
    cos, sin = dsa_model.rotary(pos)
    q_in, _ = attn._inputs(x, cos, sin)
    idx, valid = attn.indexer.select(x, q_in, cos, sin, attn.indexer.keys(x, cos, sin), pos, pos)
    k = dsa_model.cfg.index_topk
    assert idx.shape == (2, SEQ, k)
    assert torch.equal(valid.sum(-1), (pos + 1).clamp(max=k))                  # min(t + 1, k) keys
    assert bool((torch.where(valid, idx, 0) <= pos[..., None]).all())           # never a future token
    assert len({tuple(sorted(r)) for r in idx[0, k:].tolist()}) > SEQ // 2      # selections vary per query


def test_sparse_paths_agree_and_differ_from_dense(dsa_model, assert_rel_close, rel_err, monkeypatch):
    """Masked naive (training), gathered MQA (inference prefill) and the absorbed path give one answer; scoring
    and gathering in many small query chunks too."""
    ids = _ids(dsa_model.cfg)
    masked = dsa_model(ids)                                  # autograd on: masked naive path
    with torch.no_grad():
        gathered = dsa_model(ids)
        absorbed = dsa_model(ids, absorb=True)
        monkeypatch.setattr(indexer_mod, "_CHUNK_ELEMENTS", 5 * SEQ * 8)
        monkeypatch.setattr(mla_mod, "_GATHER_ELEMENTS", 3 * 12 * 40)
        chunked = dsa_model(ids)
        dense = _dense_twin(dsa_model, index_topk=None)(ids)
    assert_rel_close(gathered, masked, TOL, "gathered vs masked")
    assert_rel_close(absorbed, masked, TOL, "absorbed vs masked")
    assert_rel_close(chunked, gathered, TOL, "chunked vs whole")
    assert rel_err(gathered, dense) > 100 * TOL


def test_sparse_decode_and_chunked_prefill_equal_sparse_prefill(dsa_model, assert_rel_close):
    cfg, ids = dsa_model.cfg, _ids(dsa_model.cfg, seq=SEQ)
    assert _topk_margin(dsa_model, ids) > 1e-5   # 100x float rounding
    with torch.no_grad():
        full = dsa_model(ids)
        cache = LatentCache(cfg, slots=2, max_len=SEQ)
        steps = [dsa_model(ids[:, :5], cache=cache)]
        for t in range(5, SEQ):
            steps.append(dsa_model(ids[:, t:t + 1], torch.full((2, 1), t), cache=cache))
        assert_rel_close(torch.cat(steps, 1), full, TOL, "decode vs prefill")
        # chunks of 7 through the absorbed path, rows in swapped cache slots
        cache = LatentCache(cfg, slots=3, max_len=SEQ)
        slots = torch.tensor([2, 0])
        chunks = [dsa_model(ids[:, t:t + 7], torch.arange(t, min(t + 7, SEQ)).expand(2, -1), cache=cache,
                            slots=slots) for t in range(0, SEQ, 7)]
        assert_rel_close(torch.cat(chunks, 1), full, TOL, "chunked prefill vs prefill")
        assert cache.index[:, 1].abs().sum() == 0 and cache.index[:, 2].abs().sum() > 0


def test_shared_prefix_forward_equals_the_concatenated_rows(dsa_model, assert_rel_close):
    g = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (20, 9)]
    conts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (14, 25, 6)]
    group = [0, 1, 0]
    pid = torch.tensor([p + [0] * (20 - len(p)) for p in prefixes])
    cid = torch.tensor([c + [0] * (25 - len(c)) for c in conts])
    with torch.no_grad():
        h_p, h_c = dsa_model.prefix_shared_hidden_states(pid, torch.tensor([20, 9]), cid, torch.tensor(group))
        for b, (n, c) in enumerate(zip(group, conts)):
            p = prefixes[n]
            h = dsa_model.hidden_states(torch.tensor([p + c]))[0]
            assert_rel_close(h_c[b, :len(c)], h[len(p):], TOL, f"continuation {b}")
            assert_rel_close(h_p[n, :len(p)], h[:len(p)], TOL, f"prefix {n}")


# ---- inference --------------------------------------------------------------------------------------------

def test_engine_with_dsa_equals_greedy_generate(dsa_model):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (15, 3, 22)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for kwargs in ({}, {"speculative": "mtp"}):
        outs = LLM(dsa_model, max_num_seqs=4, **kwargs).generate([{"prompt_token_ids": p} for p in prompts], params)
        for p, o in zip(prompts, outs):
            assert o.outputs[0].token_ids == greedy_generate(dsa_model, torch.tensor([p]), 24)[0, len(p):].tolist()
    two = LLM(dsa_model, max_num_seqs=4).generate([{"prompt_token_ids": prompts[2]}],
                                                 SamplingParams(max_tokens=24, temperature=0.0, n=2, ignore_eos=True))
    assert [c.token_ids for c in two[0].outputs] == [outs[2].outputs[0].token_ids] * 2   # copied slot, index keys too


def test_engine_cache_accounting_and_info_include_the_indexer_keys(dsa_model, capsys):
    cfg = dsa_model.cfg
    engine = LLMEngine(dsa_model, max_num_seqs=3, max_model_len=100)
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim) * 4
    assert engine.cache_bytes_per_token == per_token and engine.runner.cache.nbytes == 3 * 100 * per_token
    assert "index_head_dim 16" in engine.cache_info
    from nanoseek.cli import main
    assert main(["info", "--preset", "v3.2-671b"]) == 0
    out = capsys.readouterr().out
    assert "model_type deepseek_v32" in out and "top-2048" in out and "15,616 B per token" in out


# ---- checkpoints: HF parity, export, FP8 ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_v32(tmp_path_factory, build_hf_model):
    cfg = _cfg(num_nextn_predict_layers=0)
    hf = _fix_key_norm_bias(build_hf_model(cfg, seed=5), seed=5)
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    path = tmp_path_factory.mktemp("hf_v32")
    hf.save_pretrained(path)
    return path, hf, cfg


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, attention_mask=torch.ones_like(ids)).logits


def test_logits_match_transformers_deepseek_v32(hf_v32, load_nanoseek, assert_rel_close, rel_err, monkeypatch):
    path, hf, cfg = hf_v32
    ns = load_nanoseek(path)
    assert ns.cfg == cfg and ns.cfg.index_topk * 4 == SEQ
    torch.testing.assert_close(ns.model.layers[2].self_attn.indexer.k_norm.bias,
                               hf.model.layers[2].self_attn.indexer.k_norm.bias, rtol=0, atol=0)
    ids = _ids(cfg)
    assert _topk_margin(ns, ids) > 1e-5   # 100x float rounding
    expected = _hf_logits(hf, ids)
    with torch.no_grad():
        assert_rel_close(ns(ids), expected, TOL, "V3.2 logits (gathered)")
        assert_rel_close(ns(ids, absorb=True), expected, TOL, "V3.2 logits (absorbed)")
    assert_rel_close(ns(ids), expected, TOL, "V3.2 logits (masked, autograd)")
    with torch.no_grad():   # the check has teeth: dense attention, or MLA's interleaved RoPE in the indexer, miss
        assert rel_err(_dense_twin(ns, index_topk=None)(ids), expected) > 100 * TOL
        monkeypatch.setattr(indexer_mod, "apply_rope_half", apply_rope)
        assert rel_err(ns(ids), expected) > 100 * TOL


def test_cached_greedy_decoding_matches_transformers_generate(hf_v32, load_nanoseek, transformers_mod):
    path, hf, cfg = hf_v32
    ns = load_nanoseek(path)
    prompt = _ids(cfg, seq=8, seed=5)
    gen = transformers_mod.GenerationConfig(do_sample=False, max_new_tokens=40, min_new_tokens=0, eos_token_id=None,
                                            bos_token_id=None, pad_token_id=0)
    saved, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
    try:
        with torch.no_grad():
            expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
    finally:
        hf.generation_config.eos_token_id = saved
    got = greedy_generate(ns, prompt, 40)
    mismatch = (got != expected).nonzero()
    assert mismatch.numel() == 0, f"first divergence at (row, pos) {mismatch[0].tolist()}"
    assert len(set(got[:, 8:].flatten().tolist())) > 5
    dense = greedy_generate(_dense_twin(ns, index_topk=None), prompt, 40)
    assert not torch.equal(dense, got), "sparse attention must change this continuation"


def test_export_loads_in_transformers_as_deepseek_v32(dsa_model, tmp_path, transformers_mod, assert_rel_close):
    nanoseek.save_pretrained(dsa_model, tmp_path)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["model_type"] == "deepseek_v32" and written["index_topk"] == 12
    stored = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.self_attn.indexer."
    assert {k[len(prefix):] for k in stored if k.startswith(prefix)} == {
        "wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"}
    assert any(k.startswith("model.layers.3.self_attn.indexer.") for k in stored)   # the MTP block's indexer
    hf, info = transformers_mod.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                     attn_implementation="eager",
                                                                     output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV32ForCausalLM" and not info["missing_keys"]
    assert all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])   # only the MTP layer
    ids = _ids(dsa_model.cfg, seq=64, seed=2)
    with torch.no_grad():
        assert_rel_close(_hf_logits(hf.eval(), ids), dsa_model(ids), TOL, "transformers on a nanoseek V3.2 export")
    back = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    assert back.cfg == dsa_model.cfg
    with torch.no_grad():
        assert torch.equal(back(ids), dsa_model(ids))


def test_fp8_export_quantizes_wq_b_and_wk_only(dsa_model, tmp_path):
    nanoseek.save_pretrained(dsa_model, tmp_path, fp8=True)
    stored = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.1.self_attn.indexer."
    for name in ("wq_b.weight", "wk.weight"):
        assert stored[prefix + name].dtype == torch.float8_e4m3fn and prefix + name + "_scale_inv" in stored
    for name in ("weights_proj.weight", "k_norm.weight", "k_norm.bias"):
        assert stored[prefix + name].dtype == torch.float32 and prefix + name + "_scale_inv" not in stored
    back = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    expected = block_dequantize(stored[prefix + "wq_b.weight"], stored[prefix + "wq_b.weight_scale_inv"],
                                dtype=torch.float32)
    assert torch.equal(back.model.layers[1].self_attn.indexer.wq_b.weight, expected)
    assert not torch.equal(expected, dsa_model.model.layers[1].self_attn.indexer.wq_b.weight)


# ---- training -----------------------------------------------------------------------------------------------

def test_recorded_kl_terms_cover_the_right_keys(dsa_model):
    ids = _ids(dsa_model.cfg, seq=SEQ)
    for dense in (True, False):
        recorder = IndexerRecorder(dense=dense)
        h = dsa_model.hidden_states(ids, recorder=recorder)
        dsa_model.mtp_hidden_states(h, ids, recorder)
        records = recorder.take()
        assert [r.layer for r in records] == [0, 1, 2, 3] and recorder.take() == []
        for r in records:
            assert r.logits.requires_grad and not r.target.requires_grad
            torch.testing.assert_close(r.target.sum(-1), torch.ones(r.target.shape[:2]))
            assert bool((r.target[~r.keys] == 0).all()) and bool(torch.isinf(r.logits[~r.keys]).all())
            t = torch.arange(r.keys.shape[1])
            expected = t + 1 if dense else (t + 1).clamp(max=dsa_model.cfg.index_topk)
            assert torch.equal(r.keys.sum(-1), expected.expand_as(r.keys.sum(-1)))


def test_dense_warmup_lowers_the_indexer_kl_and_trains_only_the_indexer(make_model):
    model = _fix_key_norm_bias(make_model(_cfg(num_nextn_predict_layers=0), seed=21), seed=21).train()
    prepare_step(model, "dense_warmup")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(model.cfg, batch=4, seq=32, seed=9)
    kls = []
    for _ in range(40):
        recorder = IndexerRecorder(dense=True)
        model.hidden_states(ids, recorder=recorder)
        kl = indexer_kl_loss(recorder.take())
        kl.backward()
        opt.step()
        opt.zero_grad()
        kls.append(kl.item())
    assert kls[-1] < 0.5 * kls[0], kls
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (".indexer." in n), n


TINY = dict(preset="tiny", corpus_docs=300, vocab_size=512, seq_len=64, batch_size=4, max_steps=2, save_every=0,
            val_every=0, val_batches=1, log_every=1, peak_gflops=100.0, warmup_steps=0)


def test_training_stages_and_a_yarn_context_extension(tmp_path):
    """Pretrain (no YaRN) -> extend the context 64 -> 128 with YaRN -> add an indexer and warm it up on dense
    attention -> the sparse stage, each stage continuing the previous one's last checkpoint."""
    def run(name, **overrides):
        Trainer(TrainConfig(**{**TINY, **overrides}), str(tmp_path / name), progress=False).fit()
        return sorted(glob.glob(str(tmp_path / name / "checkpoints" / "step-*")))[-1]

    base = run("base", model={"rope_scaling": None, "max_position_embeddings": 64})
    yarn = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    long = run("long", init_from=base, seq_len=128, model={"rope_scaling": yarn, "max_position_embeddings": 128})
    warm = run("warm", init_from=long, model={"index_n_heads": 4, "index_head_dim": 16, "index_topk": 32},
               dsa_stage="dense_warmup", lr=1e-2, seq_len=128)
    sparse = run("sparse", init_from=warm, dsa_stage="sparse", seq_len=128, max_steps=1)
    m_long, m_warm, m_sparse = (nanoseek.from_pretrained(p) for p in (long, warm, sparse))
    assert m_long.cfg.rope_scaling["factor"] == 2.0 and m_long.cfg.max_position_embeddings == 128
    assert not m_long.cfg.has_indexer and m_warm.cfg.index_topk == 32 and m_sparse.cfg.model_type == "deepseek_v32"
    long_sd, warm_sd, sparse_sd = m_long.state_dict(), m_warm.state_dict(), m_sparse.state_dict()
    for name, t in warm_sd.items():   # the warm-up moved the indexers only
        if ".indexer." not in name:
            assert torch.equal(t, long_sd[name]), name
    assert not torch.equal(warm_sd["model.layers.0.self_attn.indexer.wq_b.weight"],
                           sparse_sd["model.layers.0.self_attn.indexer.wq_b.weight"])
    assert not torch.equal(warm_sd["model.embed_tokens.weight"], sparse_sd["model.embed_tokens.weight"])
    for name in ("warm", "sparse"):
        rows = read_jsonl(os.path.join(tmp_path, name, "metrics.jsonl"))
        assert all(r["indexer_kl"] > 0 for r in rows)
    warm_rows = read_jsonl(os.path.join(tmp_path, "warm", "metrics.jsonl"))
    assert all(r["loss"] == r["indexer_kl"] for r in warm_rows)


def test_dense_warmup_resumes_bit_exactly(tmp_path):
    Trainer(TrainConfig(**{**TINY, "max_steps": 1}), str(tmp_path / "base"), progress=False).fit()
    base = glob.glob(str(tmp_path / "base" / "checkpoints" / "step-*"))[-1]
    cfg = {**TINY, "init_from": base, "model": {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 16},
           "dsa_stage": "dense_warmup", "max_steps": 4, "save_every": 2, "lr": 1e-2, "schedule": "constant"}
    Trainer(TrainConfig(**cfg), str(tmp_path / "a"), progress=False).fit()
    Trainer(TrainConfig(**{**cfg, "max_steps": 2}), str(tmp_path / "b"), progress=False).fit()
    Trainer(TrainConfig(**cfg), str(tmp_path / "b"), resume=True, progress=False).fit()
    losses = [[r["loss"] for r in read_jsonl(os.path.join(tmp_path, run, "metrics.jsonl"))] for run in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_stage_and_continuation_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="dsa_stage needs a model with an indexer"):
        TrainConfig(**{**TINY, "dsa_stage": "sparse"})
    with pytest.raises(ConfigError, match="dsa_stage must be one of"):
        TrainConfig(**{**TINY, "dsa_stage": "warmup"})
    with pytest.raises(ConfigError, match="init_from must be a model folder"):
        TrainConfig(**{**TINY, "init_from": str(tmp_path)})
    Trainer(TrainConfig(**{**TINY, "max_steps": 1}), str(tmp_path / "base"), progress=False).fit()
    base = glob.glob(str(tmp_path / "base" / "checkpoints" / "step-*"))[-1]
    with pytest.raises(ValueError, match="changes weight shapes"):
        Trainer(TrainConfig(**{**TINY, "init_from": base, "model": {"kv_lora_rank": 16}}), str(tmp_path / "x"),
                progress=False)
    with pytest.raises(ValueError, match="needs a model with a DSA indexer"):
        Trainer(TrainConfig(**{**TINY, "init_from": base, "dsa_stage": "dense_warmup"}), str(tmp_path / "y"),
                progress=False).fit()
