"""The absorbed-MLA decode cache: per layer and token, only the normalized latent c_KV and the rotated
shared RoPE key k_pe (v3_spec.md §2.4), i.e. (kv_lora_rank + qk_rope_head_dim) values.

Memory is preallocated as `slots` rows of `max_len` tokens. A forward addresses rows through `slots`
(which request sits in which row), so requests can join and leave between steps (continuous batching)
without moving memory. Layers past `num_hidden_layers` belong to the MTP modules.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", with_mtp: bool = True):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache max_len {max_len} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
        self.max_len = max_len
        self.kv = torch.zeros(layers, slots, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(layers, slots, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    @property
    def num_slots(self) -> int:
        return self.kv.shape[1]

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.pe.nbytes

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        return cfg.kv_cache_bytes_per_token(torch.finfo(dtype).bits // 8)

    def write(self, layer: int, slots_B: torch.Tensor, positions_BT: torch.Tensor,
              kv_BTC: torch.Tensor, pe_BTR: torch.Tensor) -> None:
        if int(positions_BT.max()) >= self.max_len:
            raise ValueError(f"position {int(positions_BT.max())} is past the cache length {self.max_len}")
        rows = slots_B[:, None].expand_as(positions_BT)
        self.kv[layer][rows, positions_BT] = kv_BTC.to(self.kv.dtype)
        self.pe[layer][rows, positions_BT] = pe_BTR.to(self.pe.dtype)

    def read(self, layer: int, slots_B: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached tokens of each slot: (B, length, C) and (B, length, R)."""
        return self.kv[layer, slots_B, :length], self.pe[layer, slots_B, :length]
