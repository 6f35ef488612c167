"""Multi-head Latent Attention (V3 report §2.1.1, eqs. 1-11; v3_spec.md §2).

Two mathematically equal paths:
- naive: expand the latent with kv_b_proj into per-head keys/values and run ordinary attention
  (cheap in FLOPs; used for training and prefill);
- absorbed: fold W_UK into the query and W_UV after the attention, so attention runs directly over the
  cached latent [c_KV ; k_pe] as MQA with one 576-dim key (cheap in memory; used for cached decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import LatentCache
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions_BT: torch.Tensor,
                cache: LatentCache | None = None, slots_B: torch.Tensor | None = None,
                absorb: bool = False) -> torch.Tensor:
        """Attention output (B, T, D).

        Without a cache, tokens attend causally to each other. With a cache, the new latents are written
        at `positions_BT` of rows `slots_B`, and with `absorb` the queries attend to every cached token at
        a position <= their own (chunked prefill, decode, speculative verification).
        """
        B, T, _ = x_BTD.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BTHK = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q_BTHK.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        kv_raw, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_rank, self.rope], dim=-1)
        c_kv_BTC = self.kv_a_layernorm(kv_raw)
        k_pe_BTR = apply_rope(k_pe, cos, sin)
        if cache is not None:
            cache.write(self.layer_idx, slots_B, positions_BT, c_kv_BTC, k_pe_BTR)
        if absorb:
            if cache is not None:
                c_kv_BTC, k_pe_BTR = cache.read(self.layer_idx, slots_B, int(positions_BT.max()) + 1)
                c_kv_BTC, k_pe_BTR = c_kv_BTC.to(x_BTD.dtype), k_pe_BTR.to(x_BTD.dtype)
                key_pos_BS = torch.arange(c_kv_BTC.shape[1], device=x_BTD.device)[None]
            else:
                key_pos_BS = positions_BT
            mask_BTS = key_pos_BS[:, None, :] <= positions_BT[:, :, None]
            o_BTHV = self._absorbed(q_nope, q_pe, c_kv_BTC, k_pe_BTR, mask_BTS)
        else:
            o_BTHV = self._naive(q_nope, q_pe, c_kv_BTC, k_pe_BTR)
        return self.o_proj(o_BTHV.reshape(B, T, self.n_heads * self.v_dim))

    def _naive(self, q_nope, q_pe, c_kv_BTC, k_pe_BTR) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv_BTC).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe_BTR[:, :, None].expand(B, T, H, self.rope)], dim=-1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.softmax_scale)
        return o.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, c_kv_BSC, k_pe_BSR, mask_BTS) -> torch.Tensor:
        w_BKC = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        w_uk_HNC, w_uv_HVC = w_BKC.split([self.nope, self.v_dim], dim=1)
        q_lat = torch.einsum("bthn,hnc->bhtc", q_nope, w_uk_HNC.to(q_nope.dtype))   # W_UK absorbed into q
        q = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1)                       # (B, H, T, C + R)
        k = torch.cat([c_kv_BSC, k_pe_BSR], dim=-1)[:, None]                        # one shared key head
        o_lat = F.scaled_dot_product_attention(q, k, c_kv_BSC[:, None], attn_mask=mask_BTS[:, None],
                                               scale=self.softmax_scale, enable_gqa=True)
        return torch.einsum("bhtc,hvc->bthv", o_lat, w_uv_HVC.to(o_lat.dtype))       # W_UV after attention
