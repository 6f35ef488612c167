"""Multi-head Latent Attention (V3 report §2.1.1, eqs. 1-11; docs/design/mla.md).

Two mathematically equal paths:
- naive: expand the latent with kv_b_proj into per-head keys/values and run ordinary attention
  (cheap in FLOPs; used for training and prefill);
- absorbed: fold W_UK into the query and W_UV after the attention, so attention runs directly over the
  cached latent [c_KV ; k_pe] as MQA with one 576-dim key (cheap in memory; used for cached decoding).

Without autograd (decode), the absorbed path can also fold W_UK into q_b_proj and W_UV into o_proj once,
instead of applying them per step: a decode step is then a linear, attention over the latent, and a
linear. The folded weights are derived state, rebuilt whenever a source weight is replaced, moved, cast
or updated in place by an op that bumps its version counter. Fused optimizers
(torch.optim.AdamW(fused=True)) update in place without bumping it, so code that trains a model and
decodes with it in turn (GRPO) must call `invalidate_caches()` after each optimizer step. The folded
weights are only used where they cost at most 2x the unfolded projections' FLOPs (true for the small
presets, where every saved op counts; not for V2/V3, whose 512-wide latent makes the folded projections
3-4x larger).

DeepSeek Sparse Attention (V3.2; docs/design/dsa.md): with `index_topk` set, a lightning indexer
(model/indexer.py) picks per query the index_topk visible tokens it scores highest, and attention sees only
those. Whenever no query has more visible tokens than that, the selection is skipped: attention is dense MLA,
bit for bit. Otherwise:
- training forwards (autograd on) and the prefix-sharing forward: the naive path with every unselected key
  masked (the V3.2 report's masked-MHA form for short sequences);
- inference (prefill, chunked prefill, decode, verification): MQA over the latent rows of the selected tokens
  only, gathered per query, so the attention work per query is O(index_topk), not O(context).
The indexer reads detached inputs; a training forward given an `IndexerRecorder` also records the indexer's
scores and the main attention's head-averaged probabilities, the two sides of its KL loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import LatentCache
from .indexer import Indexer, IndexerRecorder, selection_mask
from .norm import RMSNorm
from .rope import apply_rope

_GATHER_ELEMENTS = 1 << 24  # latent values a sparse inference forward gathers at once: 64 MB of fp32


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = H = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = C = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk = cfg.qk_head_dim
        # a plain flag: hasattr on a missing submodule raises inside nn.Module.__getattr__ (microseconds per call)
        self.q_lora = cfg.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None
        # multiply-adds per token: q projection + W_UK + W_UV + o_proj, unfolded vs folded
        q_in, D = cfg.q_lora_rank or cfg.hidden_size, cfg.hidden_size
        unfolded = q_in * H * qk + H * self.nope * C + H * C * self.v_dim + H * self.v_dim * D
        self.fold = q_in * H * (C + self.rope) + H * C * D <= 2 * unfolded
        self._folded = None  # (source weights' identity and versions, w_q, w_o); not a parameter
        # the attention core's dtype in training when it should not follow autocast's (None: it follows); set on a
        # built model by the training runs where the machine measured it faster (nanoseek/machine.py)
        self.core_dtype: torch.dtype | None = None

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions_BT: torch.Tensor,
                cache: LatentCache | None = None, slots_B: torch.Tensor | None = None,
                absorb: bool = False, bias_BMS: torch.Tensor | None = None,
                recorder: IndexerRecorder | None = None) -> torch.Tensor:
        """Attention output (B, T, D).

        Without a cache, tokens attend causally to each other. With a cache, the new latents are written
        at `positions_BT` of rows `slots_B` (None: rows 0..B-1), and with `absorb` the queries attend to
        every cached token at a position <= their own (chunked prefill, decode, speculative verification).
        `bias_BMS` is the absorbed path's additive mask (`attention_bias`); the Transformer builds it once
        per forward for all layers, and it is built here when None. With an indexer, attention covers the
        selected tokens only (module docstring); `recorder` (naive path only) collects the indexer's KL terms.
        """
        B, T, _ = x_BTD.shape
        H, C, R = self.n_heads, self.kv_rank, self.rope
        q_in, latent_BTL = self._inputs(x_BTD, cos, sin)
        keys_BTK = None
        if self.indexer is not None and (cache is not None or recorder is not None or T > self.indexer.topk):
            keys_BTK = self.indexer.keys(x_BTD.detach(), cos, sin)
        if cache is not None:
            cache.write(self.layer_idx, slots_B, positions_BT, latent_BTL, keys_BTK)
        if not absorb:
            if keys_BTK is not None and (recorder is not None or T > self.indexer.topk):
                if recorder is None and not torch.is_grad_enabled():     # inference prefill
                    return self._sparse_absorbed(x_BTD, q_in, cos, sin, positions_BT, positions_BT, keys_BTK,
                                                 latent_BTL, None)
                visible_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
                return self._masked_sparse(x_BTD, q_in, cos, sin, latent_BTL, keys_BTK, visible_BTS, recorder)
            return self._naive_out(q_in, cos, sin, latent_BTL)
        if cache is not None:
            length = bias_BMS.shape[-1] if bias_BMS is not None else int(positions_BT.max()) + 1
            if self.indexer is not None and length > self.indexer.topk:
                keys_BSK = cache.read_index(self.layer_idx, slots_B, length, B)
                key_pos = torch.arange(length, device=x_BTD.device)[None]
                rows_B = torch.arange(B, device=x_BTD.device) if slots_B is None else slots_B
                return self._sparse_absorbed(x_BTD, q_in, cos, sin, positions_BT, key_pos, keys_BSK,
                                             cache.latent[self.layer_idx], rows_B)
            latent_BSL = cache.read(self.layer_idx, slots_B, length, B).to(x_BTD.dtype)
        else:
            if self.indexer is not None and T > self.indexer.topk:
                return self._sparse_absorbed(x_BTD, q_in, cos, sin, positions_BT, positions_BT, keys_BTK,
                                             latent_BTL, None)
            latent_BSL = latent_BTL
        if bias_BMS is None:
            keys = latent_BSL.shape[1] if cache is not None else positions_BT
            bias_BMS = attention_bias(positions_BT, keys, H, x_BTD.dtype)
        if self.fold and not torch.is_grad_enabled():
            w_q, w_o = self._folded_weights()
            q_BTHL = F.linear(q_in, w_q).view(B, T, H, C + R)     # per head [W_UK^T q_nope ; q_pe]
            q_BTHL[..., C:] = apply_rope(q_BTHL[..., C:], cos, sin)
            o_lat_BMC = self._attend(q_BTHL.transpose(1, 2).reshape(B, H * T, C + R), latent_BSL, bias_BMS)
            return F.linear(o_lat_BMC.view(B, H, T, C).transpose(1, 2).reshape(B, T, H * C), w_o)
        q_nope, q_pe = self._q(q_in, cos, sin)
        o_BTHV = self._absorbed(q_nope, q_pe, latent_BSL, bias_BMS)
        return self.o_proj(o_BTHV.reshape(B, T, H * self.v_dim))

    def forward_with_prefix(self, x_NPD: torch.Tensor, rope_p: tuple[torch.Tensor, torch.Tensor],
                            x_BTD: torch.Tensor, rope_c: tuple[torch.Tensor, torch.Tensor], group_B: torch.Tensor,
                            mask_B1TS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward (naive path) of N prefixes and B continuations, each continuation after prefix
        group_B[b]: the prefixes attend causally to themselves; a continuation attends to its prefix's
        latents, computed once for all rows that share it, then to itself (`mask_B1TS`, True = visible,
        keys = [prefix ; continuation]). Returns the outputs (N, P, D) and (B, T, D)."""
        q_in_p, latent_NPL = self._inputs(x_NPD, *rope_p)
        q_in_c, latent_BTL = self._inputs(x_BTD, *rope_c)
        P, T = x_NPD.shape[1], x_BTD.shape[1]
        if self.indexer is not None and P + T > self.indexer.topk:
            keys_NPK, keys_BTK = self.indexer.keys(x_NPD.detach(), *rope_p), self.indexer.keys(x_BTD.detach(), *rope_c)
            causal_PP = torch.ones(P, P, dtype=torch.bool, device=x_NPD.device).tril().expand(x_NPD.shape[0], P, P)
            out_p = self._masked_sparse(x_NPD, q_in_p, *rope_p, latent_NPL, keys_NPK, causal_PP)
            out_c = self._masked_sparse(x_BTD, q_in_c, *rope_c, torch.cat([latent_NPL[group_B], latent_BTL], dim=1),
                                        torch.cat([keys_NPK[group_B], keys_BTK], dim=1), mask_B1TS[:, 0])
            return out_p, out_c
        out_p = self._naive_out(q_in_p, *rope_p, latent_NPL)
        out_c = self._naive_out(q_in_c, *rope_c, torch.cat([latent_NPL[group_B], latent_BTL], dim=1), mask_B1TS)
        return out_p, out_c

    def invalidate_caches(self) -> None:
        """Drop the folded projections; they are rebuilt from the current weights on the next decode."""
        self._folded = None

    def _inputs(self, x_BTD, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """The query path's input (q-lora: normalized c_Q) and [c_KV ; k_pe] (B, T, C + R): the cached row
        and the absorbed path's single key head."""
        q_in = self.q_a_layernorm(self.q_a_proj(x_BTD)) if self.q_lora else x_BTD
        kv_raw, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_rank, self.rope], dim=-1)
        return q_in, torch.cat([self.kv_a_layernorm(kv_raw), apply_rope(k_pe, cos, sin)], dim=-1)

    def _q(self, q_in, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries (B, T, H, nope) and rotated (B, T, H, rope)."""
        q = self.q_b_proj(q_in) if self.q_lora else self.q_proj(q_in)
        q_nope, q_pe = q.unflatten(-1, (self.n_heads, self.nope + self.rope)).split([self.nope, self.rope], -1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def _naive_out(self, q_in, cos, sin, latent_BSL, mask_B1TS=None) -> torch.Tensor:
        """Naive-path output (B, T, D) of the queries from q_in over the keys expanded from latent_BSL."""
        B, T = q_in.shape[:2]
        q_nope, q_pe = self._q(q_in, cos, sin)
        o_BTHV = self._naive(q_nope, q_pe, *latent_BSL.split([self.kv_rank, self.rope], dim=-1), mask_B1TS)
        return self.o_proj(o_BTHV.reshape(B, T, self.n_heads * self.v_dim))

    def _naive(self, q_nope, q_pe, c_kv_BSC, k_pe_BSR, mask_B1TS=None, target_keys_BTS=None):
        """Per-head attention of T queries over S keys expanded from the latent: causal (S = T) without a
        mask, else as `mask_B1TS` (True = visible). (B, T, H, V).

        With target_keys_BTS (a forward that records the indexer's KL terms) it also returns the attention
        probabilities over those keys, averaged over the heads (B, T, S), without grad: the indexer's target."""
        B, S, H = c_kv_BSC.shape[0], c_kv_BSC.shape[1], self.n_heads
        kv = self.kv_b_proj(c_kv_BSC).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe_BSR[:, :, None].expand(B, S, H, self.rope)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        width = q.shape[-1]
        if not q.is_cuda and self.v_dim < width:
            # torch's fused CPU kernel needs values as wide as the keys; narrower ones fall back to the math
            # path, which materializes the scores and is much slower at training shapes
            # (benchmarks/README.md, "Figures cited from code"). Zero columns leave the output's first
            # v_dim columns unchanged.
            v = F.pad(v, (0, width - self.v_dim))
        core = self.core_dtype
        if core is not None and q.dtype != core and torch.is_grad_enabled():
            with torch.autocast(q.device.type, enabled=False):
                o = F.scaled_dot_product_attention(q.to(core), k.to(core), v.to(core), attn_mask=mask_B1TS,
                                                   is_causal=mask_B1TS is None, scale=self.softmax_scale).to(q.dtype)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TS, is_causal=mask_B1TS is None,
                                               scale=self.softmax_scale)
        if target_keys_BTS is None:
            return o[..., :self.v_dim].transpose(1, 2)
        with torch.no_grad():   # V3.2 report §2.1: main attention summed over heads, L1-normalized
            scores_BHTS = torch.matmul(q, k.transpose(-1, -2)).float().mul_(self.softmax_scale)
            scores_BHTS.masked_fill_(~target_keys_BTS[:, None], float("-inf"))
            target_BTS = scores_BHTS.softmax(-1).mean(1)
        return o[..., :self.v_dim].transpose(1, 2), target_BTS

    def _masked_sparse(self, x_BTD, q_in, cos, sin, latent_BSL, keys_BSK, visible_BTS,
                       recorder: IndexerRecorder | None = None) -> torch.Tensor:
        """Sparse attention as the naive path with every unselected key masked (B, T, D): for autograd and for
        arbitrary visibility (`visible_BTS`, True = may attend). With a recorder, also record the indexer's
        logits and the attention's head-averaged probabilities over the keys attended to, which are every
        visible key when the recorder keeps attention dense (the warm-up)."""
        B, T = x_BTD.shape[:2]
        x_i, q_i = x_BTD.detach(), q_in.detach()
        S = keys_BSK.shape[1]
        if recorder is None:
            with torch.no_grad():
                keys_BTS = selection_mask(*self.indexer.top(self.indexer.logits(x_i, q_i, cos, sin, keys_BSK,
                                                                                visible_BTS)), S)
        else:
            logits_BTS = self.indexer.logits(x_i, q_i, cos, sin, keys_BSK, visible_BTS)
            keys_BTS = visible_BTS
            if not recorder.dense and S > self.indexer.topk:
                keys_BTS = selection_mask(*self.indexer.top(logits_BTS.detach()), S)
        q_nope, q_pe = self._q(q_in, cos, sin)
        c_kv, k_pe = latent_BSL.split([self.kv_rank, self.rope], dim=-1)
        if recorder is None:
            o_BTHV = self._naive(q_nope, q_pe, c_kv, k_pe, keys_BTS[:, None])
        else:
            o_BTHV, target_BTS = self._naive(q_nope, q_pe, c_kv, k_pe, keys_BTS[:, None], keys_BTS)
            recorder.record(self.layer_idx, logits_BTS.masked_fill(~keys_BTS, float("-inf")), target_BTS, keys_BTS)
        return self.o_proj(o_BTHV.reshape(B, T, self.n_heads * self.v_dim))

    def _sparse_absorbed(self, x_BTD, q_in, cos, sin, positions_BT, key_pos, keys_BSK, source_NSL, rows_B):
        """Sparse attention in MQA form (B, T, D), for inference: the indexer picks each query's keys among those
        at positions `key_pos` (B or 1, S) <= its own, and attention reads only their latent rows,
        source_NSL[rows_B[b], idx] (rows_B None: row b of source_NSL). Queries are processed in chunks, so
        memory stays O(chunk x index_topk) however long the input."""
        B, T, _ = x_BTD.shape
        H, C, R = self.n_heads, self.kv_rank, self.rope
        idx_BTK, valid_BTK = self.indexer.select(x_BTD, q_in, cos, sin, keys_BSK, positions_BT, key_pos)
        # row-major offsets into the flattened source: index_select of whole rows is the cheapest gather
        rows_B = torch.arange(B, device=x_BTD.device) if rows_B is None else rows_B
        flat_NL, offset_B11 = source_NSL.flatten(0, 1), (rows_B * source_NSL.shape[1])[:, None, None]
        fold = self.fold and not torch.is_grad_enabled()
        if fold:
            w_q, w_o = self._folded_weights()
            q_BTHL = F.linear(q_in, w_q).view(B, T, H, C + R)
            q_BTHL[..., C:] = apply_rope(q_BTHL[..., C:], cos, sin)
        else:
            q_nope, q_pe = self._q(q_in, cos, sin)
            w_uk_HNC = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, C)[:, :self.nope].to(q_nope.dtype)
            q_lat_HNC = torch.bmm(q_nope.reshape(B * T, H, self.nope).transpose(0, 1), w_uk_HNC)
            q_BTHL = torch.cat([q_lat_HNC.transpose(0, 1).view(B, T, H, C), q_pe], dim=-1)
        K = idx_BTK.shape[-1]
        chunk = T if torch.compiler.is_compiling() else max(1, _GATHER_ELEMENTS // (B * K * (C + R)))
        outs = []
        for t in range(0, T, chunk):
            c = slice(t, t + chunk)
            n = B * q_BTHL[:, c].shape[1]
            kv_NKL = flat_NL.index_select(0, (idx_BTK[:, c] + offset_B11).flatten()).to(q_BTHL.dtype).view(n, K, C + R)
            bias_N1K = torch.zeros(n, 1, K, dtype=q_BTHL.dtype, device=x_BTD.device).masked_fill_(
                ~valid_BTK[:, c].reshape(n, 1, K), float("-inf"))
            scores_NHK = torch.baddbmm(bias_N1K, q_BTHL[:, c].reshape(n, H, C + R), kv_NKL.transpose(1, 2),
                                       alpha=self.softmax_scale)
            p_NHK = scores_NHK.softmax(dim=-1, dtype=torch.float32).to(q_BTHL.dtype)
            outs.append(torch.bmm(p_NHK, kv_NKL[..., :C]).view(B, -1, H, C))
        o_lat_NHC = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).view(B * T, H, C)
        if fold:
            return F.linear(o_lat_NHC.view(B, T, H * C), w_o)
        w_uv_HVC = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, C)[:, self.nope:].to(o_lat_NHC.dtype)
        o_HNV = torch.bmm(o_lat_NHC.transpose(0, 1), w_uv_HVC.transpose(1, 2))
        return self.o_proj(o_HNV.transpose(0, 1).reshape(B, T, H * self.v_dim))

    def _absorbed(self, q_nope, q_pe, latent_BSL, bias_BMS) -> torch.Tensor:
        """W_UK into the query, attention over the latent, W_UV after it; (B, T, H, V). W_UK and W_UV are
        applied as bmm with the heads as the batch and all B*T tokens as rows: a broadcast matmul over
        (B, H) would copy the weights B times."""
        B, T, H, _ = q_nope.shape
        w_HKC = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_rank).to(q_nope.dtype)
        w_uk_HNC, w_uv_HVC = w_HKC.split([self.nope, self.v_dim], dim=1)
        q_lat_HNC = torch.bmm(q_nope.reshape(B * T, H, self.nope).transpose(0, 1), w_uk_HNC)
        q_lat_BHTC = q_lat_HNC.view(H, B, T, self.kv_rank).transpose(0, 1)
        q_BML = torch.cat([q_lat_BHTC, q_pe.transpose(1, 2)], dim=-1).view(B, H * T, -1)
        o_lat_BMC = self._attend(q_BML, latent_BSL, bias_BMS)
        o_lat_HNC = o_lat_BMC.view(B, H, T, self.kv_rank).transpose(0, 1).reshape(H, B * T, self.kv_rank)
        o_HNV = torch.bmm(o_lat_HNC, w_uv_HVC.transpose(1, 2))
        return o_HNV.view(H, B, T, self.v_dim).permute(1, 2, 0, 3)

    def _attend(self, q_BML, latent_BSL, bias_BMS) -> torch.Tensor:
        """MQA over the latent: one key head [c_KV ; k_pe] and one value head c_KV shared by all H query
        heads, so the heads fold into the query rows (M = H*T, head-major) and attention is three batched
        ops rather than SDPA's math fallback (its key and value widths differ). Returns (B, M, C)."""
        scores_BMS = torch.baddbmm(bias_BMS.to(q_BML.dtype), q_BML, latent_BSL.transpose(1, 2),
                                   alpha=self.softmax_scale)
        p_BMS = scores_BMS.softmax(dim=-1, dtype=torch.float32).to(q_BML.dtype)
        return torch.bmm(p_BMS, latent_BSL[..., :self.kv_rank])

    def _folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """w_q (H*(C+R), q_in): per head [W_UK^T W_q,nope ; W_q,pe]; w_o (D, H*C): per head W_O,h W_UV,h.
        Rebuilt when a source weight is replaced or updated in place (its data pointer or version moves)."""
        if torch.compiler.is_compiling():  # refreshed before the compiled forward (Transformer.hidden_states)
            return self._folded[1], self._folded[2]
        q_proj = self.q_b_proj if self.q_lora else self.q_proj
        # the stored tensors, not `.weight`: a layer may compute its weight on access (FP8 weights kept)
        stored = [t for m in (q_proj, self.kv_b_proj, self.o_proj) for t in (*m.parameters(False), *m.buffers(False))]
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in stored)
        if self._folded is None or self._folded[0] != key:
            w_qb = q_proj.weight
            H, N, R, C, V = self.n_heads, self.nope, self.rope, self.kv_rank, self.v_dim
            # ordinary tensors even if called in inference mode: they outlive it (copies, later no_grad use)
            with torch.inference_mode(False), torch.no_grad():
                w_uk_HNC, w_uv_HVC = self.kv_b_proj.weight.float().view(H, N + V, C).split([N, V], dim=1)
                w_nope_HNQ, w_pe_HRQ = w_qb.float().view(H, N + R, -1).split([N, R], dim=1)
                w_q = torch.cat([w_uk_HNC.transpose(1, 2) @ w_nope_HNQ, w_pe_HRQ], dim=1).flatten(0, 1)
                w_o = (self.o_proj.weight.float().view(-1, H, V).transpose(0, 1) @ w_uv_HVC).transpose(0, 1)
                self._folded = (key, w_q.to(w_qb.dtype), w_o.flatten(1).to(w_qb.dtype).contiguous())
        return self._folded[1], self._folded[2]


def attention_bias(positions_BT: torch.Tensor, keys: int | torch.Tensor, heads: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask (B, heads * T, S) of the absorbed path: 0 where key position <= query position, -inf
    elsewhere; rows are head-major, as the folded queries. `keys`: S (cached positions 0..S-1), or the key
    positions (B, S) themselves. With T = 1 the mask is (B, 1, S) and broadcasts over the heads."""
    key_pos = torch.arange(keys, device=positions_BT.device)[None] if isinstance(keys, int) else keys
    visible_BTS = key_pos[:, None, :] <= positions_BT[:, :, None]
    bias_BTS = torch.zeros(visible_BTS.shape, dtype=dtype, device=positions_BT.device).masked_fill_(
        ~visible_BTS, float("-inf"))
    return bias_BTS if positions_BT.shape[1] == 1 else bias_BTS.repeat(1, heads, 1)


def set_core_dtype(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Make every MLA in `module` run its attention core (scores, softmax, values) in `dtype` in training, whatever
    autocast makes of its inputs; None: the core follows autocast again. Forwards without grad keep following it."""
    for m in module.modules():
        if isinstance(m, MLA):
            m.core_dtype = dtype
