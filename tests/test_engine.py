"""The inference engine: HF parity of greedy LLM.generate, continuous batching through the step API,
abort, request validation, the cache budget, stops, logprobs, streaming deltas, chat and the R1
reasoning split."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import nanoseek
from nanoseek import ModelConfig
from nanoseek.data import Tokenizer, natural_paragraphs, train_tokenizer
from nanoseek.data.tokenizer import CHAT_TEMPLATE
from nanoseek.infer import (LLM, LLMEngine, ReasoningStream, SamplingParams, greedy_generate, prompt_opens_think,
                            split_reasoning)
from nanoseek.infer.detokenizer import IncrementalDetokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _model(seed=0, **overrides) -> nanoseek.Transformer:
    cfg = ModelConfig.preset("tiny", **{"initializer_range": 0.15, **overrides})
    return nanoseek.build_model(cfg, seed=seed).eval()


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def _reference(model, prompt, n):
    return greedy_generate(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def model():
    return _model(seed=3)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(natural_paragraphs(), vocab_size=400)


@pytest.fixture(scope="module")
def text_llm(tok):
    """A tiny model whose vocabulary is the trained tokenizer's, so outputs decode to text."""
    return LLM(_model(seed=5, vocab_size=tok.vocab_size), tokenizer=tok, max_num_seqs=4)


# ---- greedy parity -----------------------------------------------------------------------------------

def test_greedy_generate_matches_hf_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    src = _model(seed=11)
    nanoseek.save_pretrained(src, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None   # transformers falls back to it when the call's eos is None
    llm = LLM(str(tmp_path))
    assert llm.model.cfg == src.cfg and llm.tokenizer is None
    prompts, new = _prompts(src.cfg.vocab_size, [7, 3], seed=1), 32
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=new, **GREEDY))
    gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=0,
                                            eos_token_id=None, bos_token_id=None, pad_token_id=0)
    for p, out in zip(prompts, outs):
        ids = torch.tensor([p])
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)[0, len(p):]
        got = out.outputs[0].token_ids
        assert out.prompt_token_ids == p and out.finished and out.outputs[0].finish_reason == "length"
        assert got == expected.tolist(), f"first divergence at {next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)}"
        assert len(set(got)) > 5, "degenerate continuation; the comparison would be weak"


# ---- continuous batching -----------------------------------------------------------------------------

def test_batched_with_requests_joining_equals_unbatched(model):
    """Ragged requests join and leave between steps, more requests than slots; every output equals a
    batch-of-one greedy run."""
    engine = LLMEngine(model, max_num_seqs=3)
    prompts = _prompts(model.cfg.vocab_size, [5, 9, 2, 14, 6, 3], seed=2)
    lengths = [20, 7, 15, 11, 18, 4]
    expected = {f"r{i}": _reference(model, p, n) for i, (p, n) in enumerate(zip(prompts, lengths))}
    done, steps, streamed = {}, 0, {k: [] for k in expected}
    pending = list(enumerate(zip(prompts, lengths)))
    while pending or engine.has_unfinished_requests():
        if pending and steps % 3 == 0:   # a new request arrives every third step
            i, (p, n) = pending.pop(0)
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=n, **GREEDY))
        for out in engine.step():
            streamed[out.request_id] += out.outputs[0].delta_token_ids
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        assert engine.scheduler.num_free_slots + len(engine.scheduler.running_seqs()) == 3
        steps += 1
    assert done == expected
    assert streamed == expected, "the deltas must add up to the output"
    assert engine.stats.generated_tokens == sum(lengths)
    assert engine.scheduler.num_free_slots == 3


def test_compiled_decode_equals_eager_and_follows_weight_updates():
    """compile=True: ragged requests (more than slots, so rows join and leave) give the eager greedy
    tokens; after an in-place weight update (as GRPO does between rollouts) the compiled steps use the
    new weights, not values captured at compile time."""
    model = _model(seed=4)
    prompts = _prompts(model.cfg.vocab_size, [5, 9, 2, 6], seed=6)
    lengths = [12, 5, 9, 7]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in lengths]
    llm = LLM(model, max_num_seqs=3, compile=True)

    def run(reference):
        expected = [_reference(reference, p, n) for p, n in zip(prompts, lengths)]
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
        assert got == expected
        return got

    before = run(model)
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(1.5)
    # the reference decodes a copy, so nothing but the compiled path itself refreshes the model's folded weights
    assert run(copy.deepcopy(model)) != before, "the update must change the greedy tokens, or this shows nothing"


def test_abort_frees_the_slot_immediately(model):
    engine = LLMEngine(model, max_num_seqs=1)
    a, b = _prompts(model.cfg.vocab_size, [6, 4], seed=3)
    engine.add_request("a", a, SamplingParams(max_tokens=50, **GREEDY))
    engine.add_request("b", b, SamplingParams(max_tokens=10, **GREEDY))
    for _ in range(3):
        outs = engine.step()
    assert [o.request_id for o in outs] == ["a"] and engine.scheduler.num_free_slots == 0
    assert engine.abort_request("a") is True
    assert engine.scheduler.num_free_slots == 1 and engine.abort_request("a") is False
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "b"
            tokens = out.outputs[0].token_ids
    assert tokens == _reference(model, b, 10), "b reuses a's slot: stale latents must not leak in"
    engine.add_request("w", a, SamplingParams(max_tokens=5))
    assert engine.abort_request("w") and not engine.has_unfinished_requests()   # aborted while waiting


def test_n_samples_share_the_prompt_and_match_single_requests(model):
    llm = LLM(model, max_num_seqs=4)
    p = _prompts(model.cfg.vocab_size, [8], seed=4)[0]
    out = llm.generate({"prompt_token_ids": p}, SamplingParams(n=3, max_tokens=12, seed=9, temperature=1.0))[0]
    samples = [c.token_ids for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2] and len({tuple(s) for s in samples}) == 3
    alone = llm.generate({"prompt_token_ids": p}, SamplingParams(n=1, max_tokens=12, seed=9, temperature=1.0))[0]
    assert alone.outputs[0].token_ids == samples[0]
    greedy = llm.generate({"prompt_token_ids": p}, SamplingParams(n=3, max_tokens=12, **GREEDY))[0]
    assert [c.token_ids for c in greedy.outputs] == [_reference(model, p, 12)] * 3, "copied prompt cache rows"


# ---- request validation and the cache budget ------------------------------------------------------------

@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "prompt is empty"),
    ([1, 2, 512], SamplingParams(), "outside the vocabulary"),
    ([1, -1], SamplingParams(), "outside the vocabulary"),
    ([1] * 60, SamplingParams(max_tokens=5), "max_model_len"),
    ([1] * 64, SamplingParams(max_tokens=None), "max_model_len"),
    ([1], SamplingParams(n=3), "max_num_seqs"),
    ([1], SamplingParams(stop=["x"]), "tokenizer"),
])
def test_impossible_requests_raise(model, prompt, params, match):
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=64)
    with pytest.raises(ValueError, match=match):
        engine.add_request("r", prompt, params)
    assert not engine.has_unfinished_requests()


def test_duplicate_request_id_and_bad_engine_settings(model):
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=64)
    engine.add_request("r", [1, 2], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r", [3], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(model, max_model_len=model.cfg.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="speculative"):
        LLMEngine(model, speculative="eagle")
    with pytest.raises(ValueError, match="MTP module"):
        LLMEngine(_model(num_nextn_predict_layers=0), speculative="mtp")


def test_cache_bytes_are_reported_and_the_budget_is_enforced(model):
    cfg = model.cfg
    engine = LLMEngine(model, max_num_seqs=3, max_model_len=100)
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4   # float32
    assert engine.cache_bytes_per_token == per_token and engine.cache_bytes == 3 * 100 * per_token
    assert engine.runner.cache.nbytes == engine.cache_bytes and "MiB" in engine.cache_info
    spec = LLMEngine(model, max_num_seqs=3, max_model_len=100, speculative="mtp")   # + the MTP layer
    assert spec.cache_bytes == 3 * 100 * per_token * (cfg.num_hidden_layers + 1) // cfg.num_hidden_layers
    with pytest.raises(ValueError, match="cache_memory_bytes"):
        LLMEngine(model, max_num_seqs=3, max_model_len=100, cache_memory_bytes=3 * 100 * per_token - 1)
    assert LLMEngine(model, max_num_seqs=2, cache_dtype=torch.bfloat16).runner.cache.kv.dtype == torch.bfloat16
    # without max_model_len the context shrinks to what the budget holds
    assert LLMEngine(model, max_num_seqs=4, cache_memory_bytes=4 * 100 * per_token + 5).max_model_len == 100
    assert LLMEngine(model, max_num_seqs=4).max_model_len == cfg.max_position_embeddings


# ---- stops, lengths, logprobs ---------------------------------------------------------------------------

def test_max_tokens_and_finish_reason_length(model):
    outs = LLM(model).generate([[3, 4, 5], [6]], SamplingParams(max_tokens=7, **GREEDY))
    for o in outs:
        assert len(o.outputs[0].token_ids) == 7 and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].stop_reason is None
    engine = LLMEngine(model, max_num_seqs=2, max_model_len=20)
    engine.add_request("all", [3, 4, 5, 6, 7], SamplingParams(max_tokens=None, **GREEDY))
    outs = [o for _ in range(20) for o in engine.step()]
    assert len(outs) == 15 and outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 15
    assert outs[-1].outputs[0].finish_reason == "length" and not engine.has_unfinished_requests()


def test_stop_token_ids_and_eos(model):
    llm = LLM(model)
    p = [7, 8, 9, 10]
    full = llm.generate([p], SamplingParams(max_tokens=30, **GREEDY))[0].outputs[0].token_ids
    stop_id = full[6]
    out = llm.generate([p], SamplingParams(max_tokens=30, stop_token_ids=[stop_id], **GREEDY))[0].outputs[0]
    cut = full.index(stop_id) + 1
    assert out.token_ids == full[:cut] and out.finish_reason == "stop" and out.stop_reason == stop_id
    # the model's eos (cfg.eos_token_id without a tokenizer) stops unless ignore_eos
    model.cfg.eos_token_id, saved = full[4], model.cfg.eos_token_id
    try:
        out = LLM(model).generate([p], SamplingParams(max_tokens=30, temperature=0.0))[0].outputs[0]
    finally:
        model.cfg.eos_token_id = saved
    assert out.token_ids == full[:full.index(full[4]) + 1] and out.finish_reason == "stop" and out.stop_reason is None


def test_stop_strings_truncate_and_stream_without_leaking(text_llm, tok):
    prompt = "The quick brown fox"
    full = text_llm.generate(prompt, SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True) and len(full.text) > 20
    stop = full.text[12:15]
    cut = full.text.index(stop)
    out = text_llm.generate(prompt, SamplingParams(max_tokens=40, stop=[stop, "\x00never"], **GREEDY))[0].outputs[0]
    assert out.text == full.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[:len(out.token_ids)] and len(out.token_ids) < len(full.token_ids)
    kept = text_llm.generate(prompt, SamplingParams(max_tokens=40, stop=[stop], include_stop_str_in_output=True,
                                                    **GREEDY))[0].outputs[0]
    assert kept.text == full.text[:cut + len(stop)]
    # streaming through the engine: the deltas add up to the final text and never contain the stop string
    engine = text_llm.llm_engine
    engine.add_request("s", tok.encode(prompt), SamplingParams(max_tokens=40, stop=[stop], **GREEDY))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [o.outputs[0].delta_text for o in engine.step()]
    assert "".join(deltas) == out.text and stop not in "".join(deltas)


def test_incremental_detokenizer_never_emits_half_characters(tok):
    text = "naïve — 😀 ok 日本語"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2
    detok, pieces = IncrementalDetokenizer(tok), []
    for t in ids:
        pieces.append(detok.add(t))
    pieces.append(detok.flush())
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # several tokens at once, after some one by one, and the whole list in one call, give the same text
    half = len(ids) // 2
    detok = IncrementalDetokenizer(tok)
    head = "".join(detok.add(t) for t in ids[:3])
    assert head + detok.extend(ids[3:half]) + detok.extend(ids[half:], flush=True) == text
    assert IncrementalDetokenizer(tok).extend(ids, flush=True) == text


def test_streamed_and_whole_text_agree_without_stop_strings(text_llm, tok):
    """Without stop strings the text is detokenized when an output asks for it: streamed deltas (an output
    every step) and the whole output read once at the end give the same text, for a stop-token finish with
    and without include_stop_str_in_output, and a length finish."""
    prompt = tok.encode("The quick brown fox")
    full = text_llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=30, **GREEDY))[0].outputs[0]
    engine = text_llm.llm_engine
    for extra in ({}, {"stop_token_ids": [full.token_ids[9]]},
                  {"stop_token_ids": [full.token_ids[9]], "include_stop_str_in_output": True}):
        params = SamplingParams(max_tokens=30, **GREEDY, **extra)
        whole = text_llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
        engine.add_request("s", prompt, params)
        deltas = []
        while engine.has_unfinished_requests():
            deltas += [o.outputs[0].delta_text for o in engine.step()]
        ids = whole.token_ids
        kept = ids if whole.finish_reason == "length" or extra.get("include_stop_str_in_output") else ids[:-1]
        assert "".join(deltas) == whole.text == tok.decode(kept, skip_special_tokens=True), extra


def test_logprobs_match_a_direct_forward(model):
    llm = LLM(model)
    p = [9, 4, 33, 100, 7]
    out = llm.generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=1, logprobs=3,
                                           prompt_logprobs=2, ignore_eos=True))[0]
    gen = out.outputs[0]
    seq = torch.tensor([p + gen.token_ids])
    with torch.no_grad():
        lp = model(seq)[0].log_softmax(-1)
    ranks = []
    for i, (tok_id, d) in enumerate(zip(gen.token_ids, gen.logprobs)):
        row = lp[len(p) - 1 + i]
        assert d[tok_id].logprob == pytest.approx(row[tok_id].item(), abs=1e-4)
        ranks.append(d[tok_id].rank)
        assert d[tok_id].rank == int((row > row[tok_id]).sum()) + 1
        top = row.topk(3)
        for r, (v, j) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert j in d and d[j].logprob == pytest.approx(v, abs=1e-4) and (j == tok_id or d[j].rank == r)
        assert len(d) in (3, 4)
    assert max(ranks) > 1, "sampling at temperature 1 should pick a non-argmax token sometimes"
    chosen = sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(gen.token_ids))
    assert gen.cumulative_logprob == pytest.approx(chosen, abs=1e-3)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for i in range(1, len(p)):
        assert out.prompt_logprobs[i][p[i]].logprob == pytest.approx(lp[i - 1, p[i]].item(), abs=1e-4)
        assert len(out.prompt_logprobs[i]) in (2, 3)


# ---- chat and the R1 reasoning split ----------------------------------------------------------------------

@pytest.mark.parametrize("text, opened, expected", [
    ("<think>plan</think>answer", False, ("plan", "answer")),
    ("\n<think>\nplan\n</think>\n\nanswer", False, ("\nplan\n", "\n\n\nanswer")),
    ("plan</think>answer", True, ("plan", "answer")),
    ("plan without end", True, ("plan without end", "")),
    ("<think>never closed", False, ("never closed", "")),
    ("just an answer", False, (None, "just an answer")),
    ("<think>a</think>b<think>c</think>", False, ("a", "b<think>c</think>")),
    ("", True, ("", "")),
])
def test_split_reasoning(text, opened, expected):
    assert split_reasoning(text, opened) == expected


@pytest.mark.parametrize("opened", [False, True])
def test_streamed_reasoning_split_equals_the_whole_split(opened):
    rng = random.Random(0)
    texts = ["<think>let me see</think>The answer is 4.", "pre <thi<think>x</thin</think>after</think>",
             "no tags here <", "reasoning only </th", "<think>\n1+1=2\n</think>\n<answer>2</answer>"]
    for text in texts:
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            stream, r, c = ReasoningStream(opened), [], []
            for piece in pieces + [None]:
                dr, dc = stream.feed(piece) if piece is not None else stream.finish()
                r.append(dr)
                c.append(dc)
            reasoning, content = split_reasoning(text, opened)
            assert "".join(r) == (reasoning or "") and "".join(c) == content, (text, pieces)


def test_prompt_opens_think():
    assert prompt_opens_think("<|Assistant|><think>\n")
    assert not prompt_opens_think("<|Assistant|><think>a</think>b<|end_of_sentence|><|User|>q<|Assistant|>")
    assert not prompt_opens_think("plain")


def test_chat_uses_the_template_and_splits_reasoning(text_llm, tok):
    conv = [{"role": "user", "content": "What is 2+2?"}]
    out = text_llm.chat(conv, SamplingParams(max_tokens=20, **GREEDY))[0]
    rendered = tok.apply_chat_template(conv)
    assert out.prompt == rendered and out.prompt_token_ids == tok.encode(rendered)
    c = out.outputs[0]
    assert (c.reasoning_content, c.content) == split_reasoning(c.text, False)
    # a conversation list, and a template that opens <think> itself: the completion starts inside the block
    opening = Tokenizer(tok.backend, chat_template=CHAT_TEMPLATE + "<think>\n")
    llm = LLM(text_llm.model, tokenizer=opening, max_num_seqs=2)
    convs = [conv, conv + [{"role": "assistant", "content": "<think>x</think>4"}, {"role": "user", "content": "?"}]]
    outs = llm.chat(convs, SamplingParams(max_tokens=10, **GREEDY))
    assert len(outs) == 2
    for o in outs:
        c = o.outputs[0]
        assert o.prompt.endswith("<|Assistant|><think>") and c.reasoning_content is not None
        assert (c.reasoning_content, c.content) == split_reasoning(c.text, True)
