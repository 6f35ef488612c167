"""The Transformer: MLA paths, the latent cache, ragged slots, MTP, gradients, input checks, bf16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek import LatentCache, ModelConfig
from nanoseek.infer import greedy_generate

TOL = 1e-5


def _ids(cfg, batch=2, seq=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


def _positions(start, length, batch=1):
    return torch.arange(start, start + length).expand(batch, length)


# ---- MLA: naive vs absorbed -----------------------------------------------------------------------

def test_absorbed_attention_equals_naive_attention(tiny_model, assert_rel_close):
    cfg = tiny_model.cfg
    ids = _ids(cfg, seq=80)  # > original_max_position_embeddings (64): YaRN's interpolated band is used
    with torch.no_grad():
        naive = tiny_model(ids, absorb=False)
        absorbed = tiny_model(ids, absorb=True)
    assert_rel_close(absorbed, naive, TOL, "absorbed vs naive logits")


def test_absorbed_attention_equals_naive_in_one_mla_layer(tiny_model, assert_rel_close):
    """One MLA module on random inputs at shifted positions (no routing downstream)."""
    attn = tiny_model.model.layers[1].self_attn
    x = torch.randn(3, 17, tiny_model.cfg.hidden_size)
    positions = _positions(100, 17, batch=3)
    cos, sin = tiny_model.rotary(positions)
    with torch.no_grad():
        naive = attn(x, cos, sin, positions, absorb=False)
        absorbed = attn(x, cos, sin, positions, absorb=True)
    assert_rel_close(absorbed, naive, TOL, "MLA output")


@pytest.mark.parametrize("masked", [False, True])
def test_naive_attention_on_cpu_runs_a_fused_kernel_not_the_math_fallback(tiny_model, masked):
    """The value heads are narrower than the query/key heads (v_head_dim < qk_head_dim); SDPA's fused CPU
    kernel needs equal widths, so the naive path pads the values rather than fall back to the math path
    (about twice as slow forward + backward at training sizes)."""
    attn = tiny_model.model.layers[1].self_attn
    assert attn.v_dim < attn.nope + attn.rope
    x = torch.randn(2, 9, tiny_model.cfg.hidden_size, requires_grad=True)
    positions = _positions(0, 9, batch=2)
    cos, sin = tiny_model.rotary(positions)
    with torch.profiler.profile() as prof:
        if masked:  # the prefix-shared training forward's path: an explicit boolean mask
            q_in, latent = attn._inputs(x, cos, sin)
            out = attn._naive_out(q_in, cos, sin, latent, torch.ones(9, 9, dtype=torch.bool).tril()[None, None])
        else:
            out = attn(x, cos, sin, positions, absorb=False)
        out.sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_folded_absorbed_path_equals_the_unfolded_one_and_follows_weight_updates(tiny_model, assert_rel_close):
    """Without autograd the absorbed path uses W_UK folded into q_b_proj and W_UV into o_proj (derived weights,
    cached). It must equal the unfolded path (taken with grad mode on), also after the weights change in place
    (an optimizer step) or are replaced, when the cached folded weights must be rebuilt."""
    attn = copy.deepcopy(tiny_model.model.layers[1].self_attn)
    assert attn.fold
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, tiny_model.cfg.hidden_size, generator=g)
    positions = _positions(30, 5, batch=2)
    cos, sin = tiny_model.rotary(positions)
    for change in ("none", "in place", "replaced"):
        if change == "in place":
            with torch.no_grad():
                attn.kv_b_proj.weight.mul_(1.5)
                attn.o_proj.weight.add_(0.05 * torch.randn(attn.o_proj.weight.shape, generator=g))
        elif change == "replaced":
            attn.q_b_proj.weight = torch.nn.Parameter(0.2 * torch.randn(attn.q_b_proj.weight.shape, generator=g))
        unfolded = attn(x, cos, sin, positions, absorb=True)        # grad mode: the unfolded path
        with torch.no_grad():
            folded = attn(x, cos, sin, positions, absorb=True)
            naive = attn(x, cos, sin, positions, absorb=False)
        assert unfolded.requires_grad and not folded.requires_grad
        assert_rel_close(folded, unfolded, TOL, f"folded vs unfolded MLA ({change})")
        assert_rel_close(folded, naive, TOL, f"folded vs naive MLA ({change})")


def test_mla_folds_only_where_the_folded_projections_stay_small():
    """Folding grows the query projection to H*(kv_lora_rank + rope) outputs: worth it for the small presets, not
    for V2/V3's 512-wide latent (3-4x the FLOPs)."""
    with torch.device("meta"):
        folds = {name: nanoseek.model.mla.MLA(ModelConfig.preset(name), 0).fold
                 for name in ("tiny", "small", "v2-lite", "v3-671b")}
    assert folds == {"tiny": True, "small": True, "v2-lite": False, "v3-671b": False}

def test_attention_is_causal(tiny_model):
    cfg = tiny_model.cfg
    ids = _ids(cfg, batch=1, seq=30)
    changed = ids.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % cfg.vocab_size
    for absorb in (False, True):
        with torch.no_grad():
            a, b = tiny_model(ids, absorb=absorb), tiny_model(changed, absorb=absorb)
        assert torch.allclose(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-3)


def test_rows_of_a_batch_are_independent(tiny_model, assert_rel_close):
    """No token dropping or capacity limits: a sequence's logits do not depend on its batch neighbours."""
    ids = _ids(tiny_model.cfg, batch=3, seq=24)
    with torch.no_grad():
        batched = tiny_model(ids)
        for b in range(3):
            assert_rel_close(batched[b:b + 1], tiny_model(ids[b:b + 1]), TOL, f"row {b}")


def test_hidden_states_then_lm_head_is_forward(tiny_model):
    ids = _ids(tiny_model.cfg, seq=12)
    with torch.no_grad():
        h = tiny_model.hidden_states(ids)
        assert h.shape == (2, 12, tiny_model.cfg.hidden_size)
        assert torch.allclose(tiny_model.lm_head(h), tiny_model(ids), rtol=0, atol=0)


def test_shared_prefix_forward_equals_the_concatenated_rows_with_gradients(tiny_model, assert_rel_close):
    """Prefixes of different lengths, one shared by two continuations: hidden states and parameter
    gradients equal those of the padded forward of each prefix + continuation row."""
    cfg, model = tiny_model.cfg, copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in (6, 3)]
    conts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 2, 7)]
    group = [0, 1, 0]
    pid = torch.zeros(2, 6, dtype=torch.long)
    cid = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prefixes):
        pid[i, :len(p)] = torch.tensor(p)
    for i, c in enumerate(conts):
        cid[i, :len(c)] = torch.tensor(c)
    weights = torch.randn(3, 7, cfg.hidden_size, generator=g)
    h_p, h_c = model.prefix_shared_hidden_states(pid, torch.tensor([6, 3]), cid, torch.tensor(group))
    sum((h_c[b, :len(c)] * weights[b, :len(c)]).sum() for b, c in enumerate(conts)).backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0
    for b, (n, c) in enumerate(zip(group, conts)):
        p = prefixes[n]
        h = model.hidden_states(torch.tensor([p + c]))[0]
        torch.testing.assert_close(h_c[b, :len(c)], h[len(p):], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_p[n, :len(p)], h[:len(p)], rtol=1e-5, atol=1e-5)
        total = total + (h[len(p):] * weights[b, :len(c)]).sum()
    total.backward()
    assert shared_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert_rel_close(shared_grads[n], p.grad, 1e-5, n)


# ---- the latent cache ------------------------------------------------------------------------------

def test_incremental_decoding_equals_full_forward(tiny_model, assert_rel_close):
    cfg = tiny_model.cfg
    ids = _ids(cfg, batch=2, seq=72)
    with torch.no_grad():
        full = tiny_model(ids)
        cache = LatentCache(cfg, slots=2, max_len=72)
        prefill = tiny_model(ids[:, :10], cache=cache)
        assert_rel_close(prefill, full[:, :10], TOL, "prefill")
        for t in range(10, 72):
            step = tiny_model(ids[:, t:t + 1], positions=_positions(t, 1, batch=2), cache=cache)
            assert_rel_close(step, full[:, t:t + 1], TOL, f"decode step at position {t}")


def test_chunked_prefill_with_history_equals_full_forward(tiny_model, assert_rel_close):
    cfg = tiny_model.cfg
    ids = _ids(cfg, batch=2, seq=48, seed=3)
    with torch.no_grad():
        full = tiny_model(ids)
        cache = LatentCache(cfg, slots=2, max_len=48)
        start = 0
        for size in (7, 5, 1, 9, 2, 24):
            chunk = tiny_model(ids[:, start:start + size], positions=_positions(start, size, batch=2), cache=cache)
            assert_rel_close(chunk, full[:, start:start + size], TOL, f"chunk at {start}..{start + size}")
            start += size
        assert start == 48


def test_absorbed_prefill_through_the_cache(tiny_model, assert_rel_close):
    ids = _ids(tiny_model.cfg, batch=1, seq=20)
    with torch.no_grad():
        cache = LatentCache(tiny_model.cfg, slots=1, max_len=20)
        assert_rel_close(tiny_model(ids, cache=cache, absorb=True), tiny_model(ids), TOL, "absorbed prefill")


def test_ragged_slots_equal_each_sequence_alone(tiny_model, assert_rel_close):
    """Two requests in different cache rows at different positions, stepped together in one batch."""
    cfg = tiny_model.cfg
    a, b = _ids(cfg, batch=1, seq=20, seed=11), _ids(cfg, batch=1, seq=14, seed=12)
    with torch.no_grad():
        full_a, full_b = tiny_model(a), tiny_model(b)
        cache = LatentCache(cfg, slots=3, max_len=32)
        tiny_model(a[:, :12], cache=cache, slots=torch.tensor([2]))  # request A in row 2
        tiny_model(b[:, :5], cache=cache, slots=torch.tensor([0]))   # request B in row 0
        # one decode step for both: A at position 12, B at position 5
        out = tiny_model(torch.cat([a[:, 12:13], b[:, 5:6]]), positions=torch.tensor([[12], [5]]),
                         cache=cache, slots=torch.tensor([2, 0]))
        assert_rel_close(out[0:1], full_a[:, 12:13], TOL, "A decode")
        assert_rel_close(out[1:2], full_b[:, 5:6], TOL, "B decode")
        # a 3-token chunk for both, still at different positions, rows given in the other order
        out = tiny_model(torch.cat([b[:, 6:9], a[:, 13:16]]), positions=torch.stack([_positions(6, 3)[0],
                                                                                    _positions(13, 3)[0]]),
                         cache=cache, slots=torch.tensor([0, 2]))
        assert_rel_close(out[0:1], full_b[:, 6:9], TOL, "B chunk")
        assert_rel_close(out[1:2], full_a[:, 13:16], TOL, "A chunk")


def test_reused_slot_ignores_stale_entries(tiny_model, assert_rel_close):
    cfg = tiny_model.cfg
    long, short = _ids(cfg, batch=1, seq=30, seed=21), _ids(cfg, batch=1, seq=10, seed=22)
    with torch.no_grad():
        cache = LatentCache(cfg, slots=1, max_len=30)
        tiny_model(long, cache=cache)  # fills positions 0..29 of row 0
        tiny_model(short[:, :6], cache=cache)  # a new request in the same row
        steps = [tiny_model(short[:, t:t + 1], positions=_positions(t, 1), cache=cache) for t in range(6, 10)]
        assert_rel_close(torch.cat(steps, 1), tiny_model(short)[:, 6:10], TOL, "decode after slot reuse")


def test_kv_cache_bytes_per_token(tiny_cfg):
    for cfg in (tiny_cfg, ModelConfig.preset("small"), ModelConfig.preset("v3-671b")):
        for bytes_per_element in (1, 2, 4):
            expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * bytes_per_element
            assert cfg.kv_cache_bytes_per_token(bytes_per_element) == expected
            assert cfg.kv_cache_bytes_per_token(bytes_per_element) < cfg.mha_cache_bytes_per_token(bytes_per_element)
    # the allocated cache holds exactly that per token and slot (main layers, plus MTP layers when asked)
    cache = LatentCache(tiny_cfg, slots=3, max_len=20, dtype=torch.bfloat16, with_mtp=False)
    assert cache.nbytes == 3 * 20 * tiny_cfg.kv_cache_bytes_per_token(2)
    assert LatentCache.bytes_per_token(tiny_cfg, torch.bfloat16) == tiny_cfg.kv_cache_bytes_per_token(2)
    with_mtp = LatentCache(tiny_cfg, slots=3, max_len=20, dtype=torch.float32)
    layers = tiny_cfg.num_hidden_layers + tiny_cfg.num_nextn_predict_layers
    assert with_mtp.nbytes == 3 * 20 * (tiny_cfg.kv_lora_rank + tiny_cfg.qk_rope_head_dim) * layers * 4


# ---- greedy decoding ------------------------------------------------------------------------------------

def test_greedy_generate_equals_argmax_of_full_forwards(tiny_model):
    prompt = _ids(tiny_model.cfg, batch=2, seq=6, seed=5)
    out = greedy_generate(tiny_model, prompt, 20)
    assert out.shape == (2, 26) and torch.equal(out[:, :6], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, tiny_model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert torch.equal(greedy_generate(tiny_model, prompt, 0), prompt)


def test_greedy_generate_keeps_emitting_eos(tiny_model):
    prompt = _ids(tiny_model.cfg, batch=2, seq=6, seed=5)
    free = greedy_generate(tiny_model, prompt, 12)
    eos = int(free[0, 6 + 3])
    out = greedy_generate(tiny_model, prompt, 12, eos_token_id=eos)
    for row in range(2):
        hits = (free[row, 6:] == eos).nonzero()
        stop = 6 + int(hits[0]) if len(hits) else out.shape[1]
        assert torch.equal(out[row, :stop + 1], free[row, :stop + 1])
        assert (out[row, stop:] == eos).all()
    assert (out[0, 9:] == eos).all()


# ---- MTP -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_hidden_states_shapes(depth, make_model):
    model = make_model(ModelConfig.preset("tiny", num_nextn_predict_layers=depth), seed=depth)
    assert len(model.mtp) == depth
    ids = _ids(model.cfg, batch=2, seq=16)
    with torch.no_grad():
        outs = model.mtp_hidden_states(model.hidden_states(ids), ids)
    assert [tuple(o.shape) for o in outs] == [(2, 16 - k, model.cfg.hidden_size) for k in range(1, depth + 1)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert model.lm_head(outs[-1]).shape == (2, 16 - depth, model.cfg.vocab_size)


def _mtp_loss(model, ids, detach_main=True):
    h = model.hidden_states(ids)
    outs = model.mtp_hidden_states(h.detach() if detach_main else h, ids)
    loss = 0
    for k, o in enumerate(outs, start=1):  # depth k at position i predicts token i + k + 1
        logits = model.lm_head(o[:, :-1])
        loss = loss + F.cross_entropy(logits.flatten(0, 1), ids[:, k + 1:].flatten())
    return loss


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_reaches_every_mtp_parameter_and_the_shared_embedding_and_head(depth, make_model):
    model = make_model(ModelConfig.preset("tiny", num_nextn_predict_layers=depth), seed=10 + depth).train()
    ids = _ids(model.cfg, batch=4, seq=32)
    _mtp_loss(model, ids).backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    for k, module in enumerate(model.mtp):
        for part in ("enorm", "hnorm", "eh_proj", "shared_head", "self_attn", "mlp"):
            assert any(p.grad.abs().sum() > 0 for p in getattr(module, part).parameters()), f"mtp.{k}.{part}"
    # through the MTP path only (main hidden states detached): embedding rows of the inputs and the head
    emb_grad = model.model.embed_tokens.weight.grad
    assert emb_grad is not None and emb_grad[ids[:, 1:].unique()].abs().sum() > 0
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    # ...and nothing reaches the main blocks
    assert all(p.grad is None for p in model.model.layers.parameters())


def test_main_loss_reaches_every_main_parameter(make_model):
    model = make_model(ModelConfig.preset("tiny"), seed=31).train()
    ids = _ids(model.cfg, batch=4, seq=48)
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            assert p.grad is None, f"{name} got a gradient from the main loss"
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    for name, moe in model.moe_layers():
        if name.startswith("mtp."):
            continue
        counts = moe.tokens_per_expert
        assert (counts > 0).all(), f"{name}: precondition, every expert should receive tokens ({counts.tolist()})"
        for e in range(moe.n_experts):
            assert moe.experts.gate_up_proj.grad[e].abs().sum() > 0, f"{name}: expert {e} gate_up_proj"
            assert moe.experts.down_proj.grad[e].abs().sum() > 0, f"{name}: expert {e} down_proj"


def test_mtp_projection_takes_the_embedding_first_then_the_hidden_state(make_model):
    """docs/design/mtp.md: h'_i = eh_proj [enorm(Emb(t_{i+k})) ; hnorm(h_i)] -- the released eh_proj's first
    hidden_size input columns multiply the normalized embedding, the last ones the normalized hidden state."""
    model = make_model(ModelConfig.preset("tiny", num_nextn_predict_layers=1), seed=51)
    D = model.cfg.hidden_size
    ids = _ids(model.cfg, batch=2, seq=16)
    other_ids = torch.roll(ids, 1, dims=1)
    with torch.no_grad():
        h = model.hidden_states(ids)
        other_h = torch.randn_like(h)
        weight = model.mtp[0].eh_proj.weight
        full = weight.clone()
        weight[:, D:] = 0  # only the embedding half left
        base = model.mtp_hidden_states(h, ids)[0]
        assert torch.equal(model.mtp_hidden_states(other_h, ids)[0], base)
        assert not torch.allclose(model.mtp_hidden_states(h, other_ids)[0], base, atol=1e-3)
        weight.copy_(full)
        weight[:, :D] = 0  # only the hidden half left
        base = model.mtp_hidden_states(h, ids)[0]
        assert torch.equal(model.mtp_hidden_states(h, other_ids)[0], base)
        assert not torch.allclose(model.mtp_hidden_states(other_h, ids)[0], base, atol=1e-3)


def test_mtp_step_equals_training_mtp_path(make_model, assert_rel_close):
    """The drafting entry point (`mtp_step`) and the training path compute the same MTP outputs."""
    model = make_model(ModelConfig.preset("tiny", num_nextn_predict_layers=2), seed=41)
    ids = _ids(model.cfg, batch=2, seq=20)
    T = ids.shape[1]
    with torch.no_grad():
        h = model.hidden_states(ids)
        outs = model.mtp_hidden_states(h, ids)
        h1, logits1 = model.mtp_step(0, h[:, :T - 1], ids[:, 1:], _positions(0, T - 1, batch=2))
        assert_rel_close(logits1, model.lm_head(outs[0]), TOL, "depth 1")
        _, logits2 = model.mtp_step(1, h1[:, :T - 2], ids[:, 2:], _positions(0, T - 2, batch=2))
        assert_rel_close(logits2, model.lm_head(outs[1]), TOL, "depth 2")


# ---- input checks -----------------------------------------------------------------------------------------

def test_positions_beyond_max_position_embeddings_raise(tiny_model):
    cfg = tiny_model.cfg
    ids = _ids(cfg, batch=1, seq=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny_model(ids, positions=_positions(cfg.max_position_embeddings - 2, 4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny_model(_ids(cfg, batch=1, seq=cfg.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LatentCache(cfg, slots=1, max_len=cfg.max_position_embeddings + 1)
    with torch.no_grad():  # the last valid position is fine
        tiny_model(ids[:, :1], positions=_positions(cfg.max_position_embeddings - 1, 1))


@pytest.mark.parametrize("bad", [-1, 512])
def test_out_of_range_token_ids_raise(tiny_model, bad):
    assert tiny_model.cfg.vocab_size == 512
    ids = _ids(tiny_model.cfg, batch=1, seq=5)
    ids[0, 2] = bad
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        tiny_model(ids)


def test_build_model_seed_is_deterministic(tiny_cfg):
    a, b = nanoseek.build_model(tiny_cfg, seed=3), nanoseek.build_model(tiny_cfg, seed=3)
    c = nanoseek.build_model(tiny_cfg, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


# ---- bf16 ---------------------------------------------------------------------------------------------

def test_bf16_forward_stays_close_to_fp32(tiny_model, rel_err):
    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    ids = _ids(tiny_model.cfg, batch=2, seq=32)
    with torch.no_grad():
        ref = tiny_model(ids)
        out = bf16(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 0.1
    assert (out.float() - ref).abs().mean() < 0.02 * ref.abs().mean()
    assert (out.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # cached decoding runs in bf16 too
    with torch.no_grad():
        cache = LatentCache(bf16.cfg, slots=2, max_len=33, dtype=torch.bfloat16)
        bf16(ids, cache=cache)
        step = bf16(ids[:, -1:], positions=_positions(32, 1, batch=2), cache=cache)
    assert step.dtype == torch.bfloat16 and torch.isfinite(step).all()


@pytest.mark.parametrize("masked", [False, True])
def test_fp32_attention_core_under_bf16_autocast_is_the_core_on_fp32_inputs(tiny_model, masked, monkeypatch):
    """set_core_dtype(model, fp32): in training under bf16 autocast the scores, softmax and values run in fp32 on
    the bf16 projections' outputs (and its gradients flow back through them); the output is bf16 again."""
    from nanoseek.model.mla import set_core_dtype
    model = copy.deepcopy(tiny_model)
    attn = model.model.layers[1].self_attn
    x = torch.randn(2, 9, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = model.rotary(_positions(0, 9, batch=2))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] if masked else None
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(q.dtype)
        if q.dtype == torch.bfloat16:   # the reference: the same bf16 inputs through an fp32 core
            with torch.autocast("cpu", enabled=False):
                return sdpa(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
        return sdpa(q, k, v, **kwargs)

    def run(core):
        set_core_dtype(model, core)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q_in, latent = attn._inputs(xg, cos, sin)
            out = attn._naive_out(q_in, cos, sin, latent, mask)
        out.float().square().sum().backward()
        return out, xg.grad

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)   # the module mla.py calls it through
    (out, grad), (ref, ref_grad) = run(torch.float32), run(None)
    assert seen == [torch.float32, torch.bfloat16] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def test_bf16_model_keeps_rope_frequencies_in_fp32(tiny_cfg):
    """RoPE angles are position * inv_freq; bf16 frequencies (8 significant bits) put the angles of late positions
    off by up to position * 2^-9 radians. Casting the model to bf16 must not round them (as for the router bias)."""
    cfg = tiny_cfg.replace(max_position_embeddings=4096,
                           rope_scaling={**tiny_cfg.rope_scaling, "original_max_position_embeddings": 1024})
    fp32 = nanoseek.build_model(cfg, seed=0)
    positions = _positions(0, cfg.max_position_embeddings)
    cos_ref, sin_ref = fp32.rotary(positions)
    for how, bf16 in (("build_model(dtype=bf16)", nanoseek.build_model(cfg, seed=0, dtype=torch.bfloat16)),
                      ("model.to(bf16)", copy.deepcopy(fp32).to(torch.bfloat16))):
        cos, sin = bf16.rotary(positions)
        err = max((cos.float() - cos_ref).abs().max().item(), (sin.float() - sin_ref).abs().max().item())
        assert err < 1e-3, f"{how}: RoPE cos/sin are off by {err:.3g} (inv_freq dtype {bf16.rotary.inv_freq.dtype})"
