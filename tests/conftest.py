"""Shared fixtures: tiny config variants, weight perturbation, tolerance checks and HF checkpoint builders.

Helpers are exposed as fixtures (not imported from this file) so every test module stays importable on
its own. Everything is seeded; nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings

import pytest
import torch

import nanoseek
from nanoseek import ModelConfig

# Tiny models: thread start-up dominates their matmuls, and on a shared 2-core CI box a second thread
# mostly waits; one thread is faster and steadier.
torch.set_num_threads(1)


# ---- weight perturbation and comparisons --------------------------------------------------------

def _perturb(model: torch.nn.Module, std: float = 0.15, norm_std: float = 0.1, bias_std: float = 0.1,
             seed: int = 0) -> torch.nn.Module:
    """Re-draw every weight so that routing and logits are non-trivial.

    Linear/embedding/expert weights ~ N(0, std), norm weights ~ N(1, norm_std), router correction biases
    ~ N(0, bias_std). Works on HF and nanoseek modules alike (norm parameters have "norm" in their
    module name: input_layernorm, q_a_layernorm, kv_a_layernorm, norm, enorm, hnorm, shared_head.norm).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            module_name = name.split(".")[-2] if "." in name else ""
            if "norm" in module_name:
                p.copy_(1.0 + norm_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias_std * torch.randn(b.shape, generator=g))
    return model


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (a scale-free error for logits)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.detach().abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros, the comparison would be vacuous"
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: relative error {_rel_err(actual, expected):.3g} > {tol}\n{m}")


@pytest.fixture(scope="session")
def perturb():
    return _perturb


@pytest.fixture(scope="session")
def rel_err():
    return _rel_err


@pytest.fixture(scope="session")
def assert_rel_close():
    return _assert_rel_close


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- tiny configurations --------------------------------------------------------------------------

def _yarn(mscale: float = 1.0, mscale_all_dim: float = 1.0, original: int = 32, factor: float = 4.0) -> dict:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


# V3-style: q-lora, YaRN (sequence 48 > original 32), sigmoid noaux_tc, 4 groups keep 2, a dense first layer,
# v_head_dim != qk_nope_head_dim so a mix-up of the two cannot go unnoticed.
_V3_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                topk_group=2, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=0,
                max_position_embeddings=128, rope_scaling=_yarn())

# V2-style: no q latent, softmax routing without renormalization, two shared experts, top-3.
_V2_BASE = {**_V3_BASE, "model_type": "deepseek_v2", "q_lora_rank": None, "scoring_func": "softmax",
            "topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 2.0, "n_group": 1,
            "topk_group": 1, "num_experts_per_tok": 3, "n_shared_experts": 2, "v_head_dim": 16,
            "rope_scaling": _yarn(0.707, 0.707)}

# FP8: widths that are not multiples of 128, several above 128, so edge blocks are partial
# (q_b 192x136, kv_a 160x160, kv_b 256x144, o 160x128, dense 200x160, experts 48x160, vocab 300).
_FP8_BASE = dict(vocab_size=300, hidden_size=160, intermediate_size=200, moe_intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4, q_lora_rank=136, kv_lora_rank=144,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, n_shared_experts=1,
                 num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                 num_nextn_predict_layers=0, max_position_embeddings=128, rope_scaling=_yarn())

PARITY_CONFIGS = {
    "v3_mscale1": _V3_BASE,
    "v3_mscale0.707": {**_V3_BASE, "rope_scaling": _yarn(0.707, 0.707)},
    "v3_mscale_mixed": {**_V3_BASE, "rope_scaling": _yarn(1.0, 0.707)},
    "v2_greedy": _V2_BASE,
    "v2_group_limited_greedy": {**_V2_BASE, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
    "fp8": _FP8_BASE,
}


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig.preset("tiny")


@pytest.fixture(scope="session")
def parity_config():
    """name -> a fresh ModelConfig of PARITY_CONFIGS."""
    return lambda name: ModelConfig(**copy.deepcopy(PARITY_CONFIGS[name]))


@pytest.fixture(scope="session")
def make_model(perturb):
    """A perturbed nanoseek model (eval mode) for a config; deterministic for a given seed."""

    def make(cfg: ModelConfig, seed: int = 0, std: float = 0.15, bias_std: float = 0.1) -> nanoseek.Transformer:
        model = nanoseek.build_model(cfg, seed=seed)
        return perturb(model, std=std, bias_std=bias_std, seed=seed).eval()

    return make


@pytest.fixture(scope="session")
def tiny_model(make_model):
    """The tiny preset (q-lora, YaRN, grouped sigmoid routing, a dense layer, one MTP module), perturbed."""
    return make_model(ModelConfig.preset("tiny"), seed=1234)


# ---- HF transformers checkpoints --------------------------------------------------------------------

@pytest.fixture(scope="session")
def transformers_mod():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="session")
def build_hf_model(transformers_mod, perturb):
    """An HF DeepseekV3/V2ForCausalLM (eval, float32, eager attention) for a nanoseek config, perturbed."""

    def build(cfg: ModelConfig, seed: int = 0):
        hf_cfg = transformers_mod.AutoConfig.for_model(**cfg.to_hf())
        torch.manual_seed(seed)
        model = transformers_mod.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32,
                                                                  attn_implementation="eager")
        return perturb(model, seed=seed).eval()

    return build


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, parity_config, build_hf_model):
    """name -> (folder written by HF save_pretrained, the HF model, the nanoseek config); built once per name."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cfg = parity_config(name)
            model = build_hf_model(cfg, seed=sum(map(ord, name)))
            path = tmp_path_factory.mktemp(f"hf_{name}")
            model.save_pretrained(path)
            cache[name] = (path, model, cfg)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def load_nanoseek():
    """nanoseek.from_pretrained in float32, silencing only the 'declares MTP but stores none' warning."""

    def load(path, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MTP layer.*stores none.*")
            return nanoseek.from_pretrained(path, dtype=kwargs.pop("dtype", torch.float32), **kwargs)

    return load


@pytest.fixture
def copy_dir(tmp_path):
    """Copy a checkpoint folder into a fresh tmp folder (to corrupt it without touching the original)."""
    count = [0]

    def copy_(src) -> str:
        count[0] += 1
        dst = tmp_path / f"copy{count[0]}"
        shutil.copytree(src, dst)
        return os.fspath(dst)

    return copy_


# ---- the server tests (a module defines a `server` fixture, a LiveServer, and its API KEY) ----------------

@pytest.fixture(scope="module")
def http(server, request):
    """An httpx client of the module's `server`, authorised with the module's KEY."""
    import httpx
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {request.module.KEY}"},
                      timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def server_idle_after(request):
    """Every test that used a `server` leaves its engine with all slots free (nothing leaks across tests)."""
    yield
    if "server" in request.fixturenames:
        assert request.getfixturevalue("server").wait_idle(), "a request still holds a cache slot"
