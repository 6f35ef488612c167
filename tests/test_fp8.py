"""FP8 training (DeepSeek-V3's recipe): tile and block quantization against a plain reference, the FP8 GEMM
emulation, the FP8 linear and grouped experts against fp32 within E4M3's precision, the model transform and a
--precision fp8 training run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.fp8 import block_dequantize, block_quantize, tile_dequantize, tile_quantize
from nanoseek.fp8.convert import FP8Config, convert_to_fp8
from nanoseek.fp8.experts import FP8Experts
from nanoseek.fp8.gemm import fp8_mm
from nanoseek.fp8.linear import FP8Linear, fp8_linear

E4M3_MAX = 448.0
# E4M3 keeps 3 mantissa bits: a value is rounded within half a unit in the last place, 2^-4 of it. A product of
# two rounded operands is within about 2 x 2^-4; sums of such terms keep that relative bound in norm.
PRODUCT_BOUND = 2 * 2 ** -4


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _reference_tiles(x: torch.Tensor, tile: int, ue8m0: bool):
    """Scale and rounded values tile by tile, written out plainly."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scales, values = [], torch.empty_like(rows)
    for r, row in enumerate(rows):
        row_scales = []
        for start in range(0, row.numel(), tile):
            part = row[start:start + tile]
            scale = max(part.abs().max().item(), 1e-12) / E4M3_MAX
            if ue8m0:
                scale = 2.0 ** math.ceil(math.log2(scale))
            row_scales.append(scale)
            values[r, start:start + tile] = (part / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
        scales.append(row_scales)
    return torch.tensor(scales).reshape(*x.shape[:-1], -1), values.reshape(x.shape)


@pytest.mark.parametrize("shape", [(3, 300), (2, 5, 128), (7, 1), (1, 257)])
@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_tile_quantize_matches_a_plain_reference(shape, fmt):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, shape[-1])
    q, s = tile_quantize(x, scale_fmt=fmt)
    want_s, want_q = _reference_tiles(x, 128, fmt == "ue8m0")
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (*shape[:-1], math.ceil(shape[-1] / 128))
    torch.testing.assert_close(s, want_s, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.float(), want_q, rtol=0, atol=0)
    if fmt == "ue8m0":
        assert torch.equal(torch.exp2(torch.log2(s).round()), s), "ue8m0 scales are powers of two"
    assert rel(tile_dequantize(q, s), x) < 2 ** -4


@pytest.mark.parametrize("shape", [(200, 300), (128, 128), (5, 130)])
@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_block_quantize_edge_blocks_and_scale_formats(shape, fmt):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    w[-1, -1] = 50.0                                       # an outlier in the edge block sets only that block's scale
    q, s = block_quantize(w, scale_fmt=fmt)
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    amax = max(w[(s.shape[0] - 1) * 128:, (s.shape[1] - 1) * 128:].abs().max().item(), 1e-12)
    expected = amax / E4M3_MAX if fmt is None else 2.0 ** math.ceil(math.log2(amax / E4M3_MAX))
    assert s[-1, -1].item() == pytest.approx(expected, rel=1e-6)
    assert rel(block_dequantize(q, s), w) < 2 ** -4


def test_emulated_gemm_is_dequantize_then_fp32_matmul():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(70, 300, generator=g), torch.randn(90, 300, generator=g)
    aq, as_ = tile_quantize(a)
    for b_q, b_s, blocks, deq in ((*block_quantize(b), True, block_dequantize), (*tile_quantize(b), False,
                                                                                   tile_dequantize)):
        assert torch.equal(fp8_mm(aq, as_, b_q, b_s, b_blocks=blocks), tile_dequantize(aq, as_) @ deq(b_q, b_s).t())


def test_fp8_linear_and_its_three_gradients_stay_within_e4m3_precision():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 70, 200, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(300, 200, generator=g)).requires_grad_()
    probe = torch.randn(4, 70, 300, generator=g)
    y = fp8_linear(x, w)
    # what the backward keeps is the activation in FP8 (tiled along the tokens), not in fp32: the memory saving
    kept = [t for t in y.grad_fn.saved_tensors if t.numel() == x.numel()]
    assert [t.dtype for t in kept] == [torch.float8_e4m3fn]
    (y * probe).sum().backward()
    got = (y.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    y_ref = x @ w.t()
    (y_ref * probe).sum().backward()
    for name, a, b in zip(("output", "input gradient", "weight gradient"), got, (y_ref, x.grad, w.grad)):
        err = rel(a, b)
        assert 0 < err < PRODUCT_BOUND, f"{name}: relative error {err:.4f}"


def test_fp8_experts_equal_per_expert_fp8_linears():
    cfg = nanoseek.ModelConfig.preset("tiny", hidden_size=96, moe_intermediate_size=160, n_routed_experts=6, n_group=3,
                                      topk_group=2)
    experts = FP8Experts(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        experts.gate_up_proj.copy_(0.3 * torch.randn(experts.gate_up_proj.shape, generator=g))
        experts.down_proj.copy_(0.3 * torch.randn(experts.down_proj.shape, generator=g))
    counts = torch.tensor([5, 0, 7, 3, 9, 2])              # expert 1 gets no token
    x = torch.randn(int(counts.sum()), 96, generator=g, requires_grad=True)
    probe = torch.randn(x.shape[0], 96, generator=g)
    (experts(x, counts) * probe).sum().backward()
    grads = (x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())

    x_ref = x.detach().clone().requires_grad_()
    w13 = experts.gate_up_proj.detach().clone().requires_grad_()
    w2 = experts.down_proj.detach().clone().requires_grad_()
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        gate, up = fp8_linear(x_ref[start:start + n], w13[e]).chunk(2, dim=-1)
        outs.append(fp8_linear(F.silu(gate) * up, w2[e]))
        start += n
    (torch.cat(outs) * probe).sum().backward()
    for name, a, b in zip(("x", "gate_up_proj", "down_proj"), grads, (x_ref.grad, w13.grad, w2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert grads[1][1].abs().sum() == 0 and grads[2][1].abs().sum() == 0


def test_convert_keeps_names_and_the_high_precision_modules():
    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny"), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_fp8(model, FP8Config(scale_fmt="ue8m0"))
    assert model.state_dict().keys() == before.keys()
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.kv_b_proj"] is FP8Linear and kinds["model.layers.1.mlp.experts"] is FP8Experts
    assert kinds["lm_head"] is torch.nn.Linear and kinds["mtp.0.eh_proj"] is torch.nn.Linear
    assert kinds["model.embed_tokens"] is torch.nn.Embedding
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    plain = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny"), seed=0)
    with torch.no_grad():
        assert 0 < rel(model(ids), plain(ids)) < 0.1


def test_precision_fp8_trains_end_to_end(tmp_path):
    from nanoseek.train import TrainConfig, Trainer
    from nanoseek.train.state import list_checkpoints
    cfg = TrainConfig(preset="tiny", corpus_docs=200, vocab_size=400, seq_len=32, batch_size=4, max_steps=8,
                      save_every=0, val_every=0, log_every=4, peak_gflops=100.0, warmup_steps=1, precision="fp8")
    trainer = Trainer(cfg, str(tmp_path), progress=False)
    assert any(isinstance(m, FP8Linear) for m in trainer.model.modules())
    first = trainer.train_step()["loss"]
    last = trainer.fit()
    assert math.isfinite(last["loss"]) and last["loss"] < first
    nanoseek.from_pretrained(list_checkpoints(str(tmp_path / "checkpoints"))[-1])   # saved as an ordinary model


def test_fp8_export_with_power_of_two_scales_loads_back(tmp_path):
    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny"), seed=0)
    nanoseek.save_pretrained(model, tmp_path, fp8=True, scale_fmt="ue8m0")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        scales = [f.get_tensor(k) for k in f.keys() if k.endswith("weight_scale_inv")]
        assert f.get_tensor("model.layers.0.self_attn.kv_b_proj.weight").dtype == torch.float8_e4m3fn
    assert scales and all(torch.equal(torch.exp2(torch.log2(s).round()), s) for s in scales)
    back = nanoseek.from_pretrained(tmp_path)
    for name, t in model.state_dict().items():
        if t.abs().sum() > 0:                               # (the routing biases start at zero)
            assert rel(back.state_dict()[name], t) < 2 ** -4, name


def test_fp8_weights_kept_for_inference_decode_like_the_dequantized_model(tmp_path):
    """FP8 weights kept (dequantized layer by layer) give the fully dequantized model's logits and greedy tokens,
    in the absorbed-MLA cached decode too, and hold the projections and experts in FP8 (a quarter of fp32)."""
    from nanoseek.fp8.weights import FP8WeightExperts, FP8WeightLinear
    from nanoseek.infer.generate import greedy_generate
    cfg = nanoseek.ModelConfig.preset("tiny")
    nanoseek.save_pretrained(nanoseek.build_model(cfg, seed=0), tmp_path, fp8=True)
    full = nanoseek.from_pretrained(tmp_path)
    kept = nanoseek.from_pretrained(tmp_path, keep_fp8=True)
    kinds = {name: type(m) for name, m in kept.named_modules()}
    assert kinds["model.layers.0.self_attn.kv_b_proj"] is FP8WeightLinear
    assert kinds["model.layers.1.mlp.experts"] is FP8WeightExperts and kinds["lm_head"] is torch.nn.Linear
    state = kept.state_dict()
    assert state["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in state
    fp8_bytes = sum(t.nbytes for t in state.values() if t.dtype == torch.float8_e4m3fn)
    full_bytes = sum(full.state_dict()[k].nbytes for k, t in state.items() if t.dtype == torch.float8_e4m3fn)
    assert fp8_bytes * 4 == full_bytes
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(kept(ids), full(ids))
    for prompts in (ids, ids[:1]):                                    # batched, and the one-token decode path
        assert torch.equal(greedy_generate(kept, prompts, 12), greedy_generate(full, prompts, 12))


def test_fp8_weights_with_a_nan_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file
    nanoseek.save_pretrained(nanoseek.build_model(nanoseek.ModelConfig.preset("tiny"), seed=0), tmp_path, fp8=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name].view(torch.uint8)[0, 0] = 0x7F                      # E4M3FN's NaN
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(nanoseek.CheckpointError, match=name.replace(".", r"\.") + r" .* 1 NaN"):
        nanoseek.from_pretrained(tmp_path, keep_fp8=True)


def test_llm_and_the_cli_serve_an_fp8_checkpoint_with_fp8_weights_kept(tmp_path, capsys):
    from nanoseek.cli import main as cli_main
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.fp8.weights import FP8WeightLinear
    tok = train_tokenizer(["the cat sat on the mat. " * 20], vocab_size=300)
    cfg = nanoseek.ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
    nanoseek.save_pretrained(nanoseek.build_model(cfg, seed=0), tmp_path, fp8=True)
    tok.save(str(tmp_path))
    params = nanoseek.SamplingParams(temperature=0, max_tokens=8)
    kept = nanoseek.LLM(tmp_path, keep_fp8=True)
    assert isinstance(kept.model.model.layers[0].self_attn.o_proj, FP8WeightLinear)
    want = nanoseek.LLM(tmp_path).generate(["the cat"], params)[0].outputs[0].token_ids
    assert kept.generate(["the cat"], params)[0].outputs[0].token_ids == want
    assert cli_main(["generate", str(tmp_path), "--prompt", "the cat", "--max-tokens", "8", "--temperature", "0",
                     "--keep-fp8"]) in (0, None)
    assert capsys.readouterr().out.strip()


def test_adamw_with_bf16_moments_is_torch_adamw_with_its_moments_rounded():
    from nanoseek.train.adamw_bf16 import AdamWBF16Moments
    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, 40, generator=g)
    params = [torch.nn.Parameter(start.clone()) for _ in range(3)]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opts = [torch.optim.AdamW([params[0]], foreach=False, **kw),
            AdamWBF16Moments([params[1]], moments_dtype=torch.float32, **kw), AdamWBF16Moments([params[2]], **kw)]
    for _ in range(20):
        grad = torch.randn(64, 40, generator=g)
        for p, opt in zip(params, opts):
            p.grad = grad.clone()
            opt.step()
    assert torch.equal(params[1], params[0])                        # the same update, moments in fp32
    assert opts[2].state[params[2]]["exp_avg_sq"].dtype == torch.bfloat16
    moved = (params[0] - start).norm()
    assert 0 < (params[2] - params[0]).norm() < 2 ** -6 * moved    # bf16 rounding of the moments only


def test_training_with_bf16_moments_resumes_exactly(tmp_path):
    from nanoseek.train import TrainConfig, Trainer
    cfg = dict(preset="tiny", corpus_docs=100, vocab_size=300, seq_len=16, batch_size=2, max_steps=4, save_every=2,
               val_every=0, log_every=1, peak_gflops=1.0, optimizer_moments="bf16")
    whole = Trainer(TrainConfig(**cfg), str(tmp_path / "a"), progress=False)
    assert type(whole.run.optimizer).__name__ == "AdamWBF16Moments"
    whole.fit()
    first = Trainer(TrainConfig(**cfg), str(tmp_path / "b"), progress=False)
    for _ in range(2):
        first.train_step()
    first.run.save(first.state_dict())
    resumed = Trainer(TrainConfig(**cfg), str(tmp_path / "b"), resume=True, progress=False)
    rows = [resumed.train_step() for _ in range(2)]
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in resumed.run.optimizer.state.values())
    want = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")][2:4]
    assert [r["loss"] for r in rows] == [w["loss"] for w in want]
