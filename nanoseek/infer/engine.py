"""LLMEngine: the step-driven core under `LLM` and the HTTP server (vLLM's engine, nano-vllm's split).

One `step()` = (1) one batched decode forward for every running sequence (plain, or MTP draft +
verify when speculative), (2) free the slots of finished sequences, (3) admit waiting requests
into free slots (continuous batching) and prefill them in one right-padded forward, which also
samples their first token. It returns a RequestOutput for every request that made progress, with
the tokens and text that are new since the last step in `delta_token_ids` / `delta_text`.

Memory: one LatentCache of max_num_seqs slots x max_model_len tokens, allocated up front:
bytes = slots x max_len x (num_hidden_layers [+ MTP layers]) x (kv_lora_rank + qk_rope_head_dim
[+ index_head_dim with DSA]) x element size. It must fit `cache_memory_bytes`, checked before allocating.

Threads: the engine holds no thread of its own. Its public methods take one internal lock, so a
server may call add_request/abort_request from another thread while a background thread loops on
step(); a call waits for the current step to end.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from ..model import Transformer
from . import speculative
from .model_runner import ModelRunner
from .outputs import PositionLogprobs, RequestOutput
from .params import SamplingParams
from .sampler import SamplingBatch, logprobs_of, sample_from_probs
from .scheduler import Scheduler
from .sequence import Request, Sequence

log = logging.getLogger("nanoseek.infer")

DEFAULT_CACHE_MEMORY_BYTES = 4 * 2**30


@dataclass
class EngineStats:
    """Counters since construction. `spec_drafted`/`spec_accepted`: MTP drafts verified / accepted."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    decode_steps: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.spec_accepted / self.spec_drafted if self.spec_drafted else 0.0


class LLMEngine:
    """Args:
        model: a nanoseek Transformer (any device/dtype; run in eval mode).
        tokenizer: a nanoseek Tokenizer (or anything with encode/decode/eos_id); None = token ids only.
        max_num_seqs: cache slots = most sequences decoding at once (an n-sample request takes n).
        max_model_len: longest prompt + output (default: max_position_embeddings, or less if the cache
            would not fit cache_memory_bytes otherwise).
        cache_dtype: dtype of the cached latents (default: the model's).
        cache_memory_bytes: the cache must fit this budget (ValueError otherwise).
        max_prefill_tokens: padded prompt tokens per prefill forward (at least one request is admitted).
        speculative: None/False, or "mtp" for MTP self-speculative decoding.
        num_speculative_tokens: drafted tokens per step (1: V3 has one MTP module).
        seed: seeds the generator that gives requests without SamplingParams.seed their seed.
        compile: run decode steps through torch.compile: the first steps compile (seconds to a minute),
            later ones fuse the many small ops of a step; on 2 CPU cores, small preset, greedy decoding is
            ~2x faster at batch 1 and ~1.5x at batch 16 (benchmarks/bench_decode.py); from ~32 rows on, where
            the matmuls dominate, it gains little.
    """

    def __init__(self, model: Transformer, tokenizer=None, max_num_seqs: int = 16, max_model_len: int | None = None,
                 cache_dtype: torch.dtype | None = None, cache_memory_bytes: int | None = DEFAULT_CACHE_MEMORY_BYTES,
                 max_prefill_tokens: int = 8192, speculative: str | bool | None = None,
                 num_speculative_tokens: int = 1, seed: int = 0, compile: bool = False):
        cfg = model.cfg
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        if speculative is True:
            speculative = "mtp"
        if speculative not in (None, False, "mtp"):
            raise ValueError(f"speculative must be False/None or 'mtp'; got {speculative!r}")
        self.speculative = speculative == "mtp"
        if self.speculative:
            if len(getattr(model, "mtp", ())) == 0:
                raise ValueError("speculative='mtp' needs a model with an MTP module "
                                 "(num_nextn_predict_layers >= 1, loaded with load_mtp=True)")
            if num_speculative_tokens != 1:
                raise ValueError(f"num_speculative_tokens must be 1 (one MTP draft per step, as in DeepSeek-V3); "
                                 f"got {num_speculative_tokens}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1; got {max_num_seqs!r}")
        param = next(model.parameters())
        dtype = cache_dtype or param.dtype
        layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if self.speculative else 0)
        index = cfg.index_head_dim or 0   # DSA: the indexer's key per layer, cached next to the latent
        self.cache_bytes_per_token = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + index) * dtype.itemsize
        if max_model_len is None:   # the model's context, shortened to what the budget holds
            max_model_len = cfg.max_position_embeddings
            if cache_memory_bytes is not None:
                fits = cache_memory_bytes // (max_num_seqs * self.cache_bytes_per_token)
                max_model_len = max(2, min(max_model_len, fits))
        self.max_model_len = max_model_len
        if not 2 <= self.max_model_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_model_len must be in [2, max_position_embeddings={cfg.max_position_embeddings}]; "
                             f"got {self.max_model_len}")
        self.cache_bytes = max_num_seqs * self.max_model_len * self.cache_bytes_per_token
        self.cache_info = (f"latent cache: {max_num_seqs} slots x {self.max_model_len} tokens x "
                           f"{self.cache_bytes_per_token} B/token ({layers} layers x (kv_lora_rank {cfg.kv_lora_rank} "
                           f"+ qk_rope_head_dim {cfg.qk_rope_head_dim}"
                           + (f" + index_head_dim {index}" if index else "")
                           + f") x {dtype.itemsize} B {str(dtype)[6:]}) "
                           f"= {self.cache_bytes / 2**20:.1f} MiB")
        if cache_memory_bytes is not None and self.cache_bytes > cache_memory_bytes:
            raise ValueError(f"{self.cache_info} exceeds cache_memory_bytes={cache_memory_bytes}: lower max_num_seqs "
                             f"or max_model_len, use a smaller cache_dtype, or raise cache_memory_bytes")
        self.runner = ModelRunner(model, max_num_seqs, self.max_model_len, dtype, with_mtp=self.speculative,
                                  compile=compile)
        log.info(self.cache_info)
        self.max_num_seqs = max_num_seqs
        self.scheduler = Scheduler(max_num_seqs, max_prefill_tokens)
        eos = (getattr(tokenizer, "eos_id", None) or getattr(tokenizer, "eos_token_id", None)) if tokenizer else None
        self.eos_token_id = eos if eos is not None else cfg.eos_token_id
        self.stats = EngineStats()
        self._seeds = torch.Generator().manual_seed(seed)
        self._lock = threading.RLock()
        self._decode = (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer else None

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None) -> None:
        """Queue a request. Raises ValueError if it can never run (empty prompt, ids outside the vocabulary,
        prompt + max_tokens > max_model_len, n > max_num_seqs, stop strings without a tokenizer, duplicate id)."""
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty (at least one token is needed)")
        bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"request {request_id!r}: prompt token {bad[0][1]} at index {bad[0][0]} is outside "
                             f"the vocabulary [0, {self.cfg.vocab_size})")
        room = self.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room or room < 1:
            raise ValueError(f"request {request_id!r}: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds max_model_len={self.max_model_len}")
        if params.n > self.max_num_seqs:
            raise ValueError(f"request {request_id!r}: n={params.n} samples exceed max_num_seqs={self.max_num_seqs}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop strings need a tokenizer (use stop_token_ids)")
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (), generator=self._seeds))
        with self._lock:
            if request_id in self.scheduler:
                raise ValueError(f"request id {request_id!r} is already in use")
            max_tokens = params.max_tokens if params.max_tokens is not None else room
            self.scheduler.add(Request(request_id, ids, params, seed % 2**63, max_tokens, self.tokenizer, prompt))
            self.stats.requests += 1

    def abort_request(self, request_id: str) -> bool:
        """Drop a request (waiting or running); its cache slots are free on return. False if unknown/finished."""
        with self._lock:
            return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self.scheduler.waiting) + len(self.scheduler.running)

    @property
    def spec_stats(self) -> dict:
        s = self.stats
        return {"drafted": s.spec_drafted, "accepted": s.spec_accepted, "acceptance_rate": s.acceptance_rate}

    # ---- one scheduler iteration ---------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One iteration (module docstring). finished_only: return only the requests that finished in it
        (for callers that want whole results, not streams: an output copies the tokens so far, so building
        one for every request at every step costs time quadratic in the length)."""
        with self._lock:
            progressed: dict[str, Request] = {}
            seqs = self.scheduler.running_seqs()
            if seqs:
                (self._spec_decode if self.speculative else self._decode_step)(seqs)
                self.stats.decode_steps += 1
                for s in seqs:
                    progressed[s.request.request_id] = s.request
            self._release_finished(seqs)
            for seq, old_slot in self.scheduler.compact():
                self.runner.copy_slot(old_slot, seq.slot, seq.num_tokens)
            admitted = self.scheduler.admit()
            if admitted:
                self._prefill(admitted)
                for r in admitted:
                    progressed[r.request_id] = r
                self._release_finished([s for r in admitted for s in r.seqs])
            self.stats.steps += 1
            outputs = []
            for req in progressed.values():
                if req.finished or not finished_only:
                    outputs.append(req.output())
                if req.finished:
                    self.scheduler.finish(req)
            return outputs

    def _release_finished(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if s.finished:
                self.scheduler.release(s)

    def _batch(self, seqs: list[Sequence]) -> SamplingBatch:
        return SamplingBatch([s.params for s in seqs], [s.generator for s in seqs], [s.prompt_ids for s in seqs],
                             [s.output_ids for s in seqs], self.cfg.vocab_size, self.runner.device)

    def _commit(self, seqs: list[Sequence], logits_BV: torch.Tensor, tokens_B: torch.Tensor,
                rows: list[int] | None = None) -> None:
        """Append tokens[b] to seqs[b] (only rows `rows` if given) with its logprobs."""
        rows = range(len(seqs)) if rows is None else rows
        if not rows:
            return
        if len(rows) < len(seqs):   # a subset: gather its rows (all rows: use the tensors as they are)
            idx = torch.tensor(list(rows), dtype=torch.long, device=logits_BV.device)
            logits_BV, tokens_B = logits_BV[idx], tokens_B[idx]
        lp, dicts = logprobs_of(logits_BV, tokens_B, [seqs[b].params.logprobs for b in rows], self._decode)
        lp = lp.tolist()
        for j, (b, t) in enumerate(zip(rows, tokens_B.tolist())):
            s = seqs[b]
            s.append(t, lp[j], dicts[j], self.eos_token_id, s.request.max_tokens)
            self.stats.generated_tokens += 1

    def _decode_step(self, seqs: list[Sequence]) -> None:
        h = self.runner.forward([[s.last_token] for s in seqs], [s.num_tokens - 1 for s in seqs],
                                [s.slot for s in seqs])
        logits = self.runner.logits(h[:, 0])
        self._commit(seqs, logits, self._batch(seqs).sample(logits))

    def _prefill(self, reqs: list[Request]) -> None:
        h = self.runner.prefill([r.prompt_ids for r in reqs], [r.seqs[0].slot for r in reqs])
        lengths = [len(r.prompt_ids) for r in reqs]
        self.stats.prompt_tokens += sum(lengths)
        last = h[torch.arange(len(reqs)), torch.tensor(lengths) - 1]
        logits_R = self.runner.logits(last)
        for i, r in enumerate(reqs):
            if r.params.prompt_logprobs is not None:
                r.prompt_logprobs = self._prompt_logprobs(h[i, :lengths[i] - 1], r)
        if self.speculative:   # the MTP cache for positions 0..P-2: h_i with t_{i+1}
            T = max(lengths) - 1
            if T > 0:
                nxt = [r.prompt_ids[1:] + [0] * (T - len(r.prompt_ids) + 1) for r in reqs]
                self.runner.mtp_fill(h[:, :T], nxt, [r.seqs[0].slot for r in reqs])
        seqs, rows = [], []
        for i, r in enumerate(reqs):
            for s in r.seqs:
                if s is not r.seqs[0]:
                    self.runner.copy_slot(r.seqs[0].slot, s.slot, lengths[i])
                if self.speculative:
                    s.pending_h = h[i, lengths[i] - 1:lengths[i]].clone()
                seqs.append(s)
                rows.append(i)
        logits = logits_R[torch.tensor(rows)]
        self._commit(seqs, logits, self._batch(seqs).sample(logits))

    def _prompt_logprobs(self, h_TD: torch.Tensor, req: Request) -> list[PositionLogprobs | None]:
        ids = req.prompt_ids
        out: list[PositionLogprobs | None] = [None]
        if len(ids) > 1:
            logits = self.runner.logits(h_TD)
            _, dicts = logprobs_of(logits, torch.tensor(ids[1:]), [req.params.prompt_logprobs] * (len(ids) - 1),
                                   self._decode)
            out += dicts
        return out

    def _spec_decode(self, seqs: list[Sequence]) -> None:
        B, D = len(seqs), self.cfg.hidden_size
        slots = [s.slot for s in seqs]
        batch = self._batch(seqs)
        # 1. draft t_n with the MTP module
        inputs = [speculative.mtp_inputs(s, D) for s in seqs]
        h_in = torch.stack([x[0] for x in inputs])
        mtp_logits = self.runner.mtp(h_in, [x[1] for x in inputs], [x[2] for x in inputs], slots)
        q_logits = mtp_logits[torch.arange(B), torch.tensor([x[3] for x in inputs])]
        if batch.all_greedy:
            q = None
            draft = batch.penalized(q_logits).argmax(-1)
        else:
            q = batch.probs(q_logits)
            draft = sample_from_probs(q, batch.uniforms())
        # 2. verify [t_{n-1}, d] at [n-1, n]
        draft_list = draft.tolist()
        h = self.runner.forward([[s.last_token, d] for s, d in zip(seqs, draft_list)],
                                [s.num_tokens - 1 for s in seqs], slots)
        logits = self.runner.logits(h)
        if batch.all_greedy:
            first = batch.penalized(logits[:, 0]).argmax(-1)
            accepted = first == draft
            second = batch.penalized(logits[:, 1], draft).argmax(-1)
        else:
            accepted, first = speculative.verify_draft(batch.probs(logits[:, 0]), q, draft, batch.uniforms(),
                                                       batch.uniforms())
            second = sample_from_probs(batch.probs(logits[:, 1], draft), batch.uniforms())
        # 3. commit one or two tokens per row; keep the hidden states the MTP module has not seen
        self.stats.spec_drafted += B
        self.stats.spec_accepted += int(accepted.sum())
        self._commit(seqs, logits[:, 0], first)
        acc = accepted.tolist()
        self._commit(seqs, logits[:, 1], second, [b for b in range(B) if acc[b] and not seqs[b].finished])
        for b, s in enumerate(seqs):
            s.pending_h = h[b, :2] if acc[b] else h[b, :1]
