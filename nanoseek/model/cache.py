"""The absorbed-MLA decode cache: per layer and token, only the normalized latent c_KV and the rotated
shared RoPE key k_pe (docs/design/mla.md), i.e. (kv_lora_rank + qk_rope_head_dim) values.

Memory is preallocated as `slots` rows of `max_len` tokens. A forward addresses rows through `slots`
(which request sits in which row), so requests can join and leave between steps (continuous batching)
without moving memory. Layers past `num_hidden_layers` belong to the MTP modules.

c_KV and k_pe live side by side in one buffer, `latent` = [c_KV ; k_pe], because that concatenation is
exactly the absorbed path's key (and its first kv_lora_rank values are the value): a decode step then
writes and reads one tensor per layer. `kv` and `pe` are views of it.

With DeepSeek Sparse Attention (cfg.index_topk) a second buffer, `index`, holds the lightning indexer's key
per layer and token (index_head_dim values, docs/design/dsa.md), addressed like the latent: decode scores
every cached token with it and attends to the top-k latents only. It is kept apart from the latent so the
dense absorbed path still reads [c_KV ; k_pe] as one contiguous tensor.
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
        self.latent = torch.zeros(layers, slots, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                  dtype=dtype, device=device)
        self.kv, self.pe = self.latent.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        self.index = (torch.zeros(layers, slots, max_len, cfg.index_head_dim, dtype=dtype, device=device)
                      if cfg.has_indexer else None)

    @property
    def num_slots(self) -> int:
        return self.latent.shape[1]

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + (self.index.nbytes if self.index is not None else 0)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        """Main layers' latent plus, with DSA, their indexer keys."""
        size = torch.finfo(dtype).bits // 8
        return cfg.kv_cache_bytes_per_token(size) + cfg.index_cache_bytes_per_token(size)

    def check(self, max_position: int) -> None:
        if max_position >= self.max_len:
            raise ValueError(f"position {max_position} is past the cache length {self.max_len}")

    def write(self, layer: int, slots_B: torch.Tensor | None, positions_BT: torch.Tensor,
              latent_BTL: torch.Tensor, index_BTK: torch.Tensor | None = None) -> None:
        """Store [c_KV ; k_pe] (B, T, C + R), and the indexer keys (B, T, index_head_dim) when given, at
        `positions_BT` of rows `slots_B` (None: rows 0..B-1). Positions are not range-checked here: the caller
        checks them once per forward (`check`)."""
        _put(self.latent, layer, slots_B, positions_BT, latent_BTL)
        if index_BTK is not None:
            _put(self.index, layer, slots_B, positions_BT, index_BTK)

    def read(self, layer: int, slots_B: torch.Tensor | None, length: int, batch: int | None = None) -> torch.Tensor:
        """The first `length` cached tokens [c_KV ; k_pe] of each slot, (B, length, C + R); with slots None,
        a view of rows 0..batch-1 (no copy)."""
        if slots_B is None:
            return self.latent[layer, :batch, :length]
        return self.latent[layer, slots_B, :length]

    def read_index(self, layer: int, slots_B: torch.Tensor | None, length: int, batch: int | None = None) -> torch.Tensor:
        """The first `length` cached indexer keys of each slot, (B, length, index_head_dim); as `read`."""
        if slots_B is None:
            return self.index[layer, :batch, :length]
        return self.index[layer, slots_B, :length]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached tokens of row src into row dst, every layer and buffer (a shared prompt)."""
        self.latent[:, dst, :length] = self.latent[:, src, :length]
        if self.index is not None:
            self.index[:, dst, :length] = self.index[:, src, :length]


def _put(buffer: torch.Tensor, layer: int, slots_B: torch.Tensor | None, positions_BT: torch.Tensor,
         rows_BTX: torch.Tensor) -> None:
    """buffer[layer, slot b, positions_BT[b, t]] = rows_BTX[b, t]."""
    rows_BTX = rows_BTX.to(buffer.dtype)
    if torch.compiler.is_compiling():
        # index_put_ on the base buffer with one index per leading dim, which inductor performs in
        # place; writing through a view (indexed or reshaped) makes the compiled graph copy the
        # entire cache for every layer (tens of milliseconds per step).
        rows_B = torch.arange(rows_BTX.shape[0], device=rows_BTX.device) if slots_B is None else slots_B
        layer_11 = rows_B.new_full((1, 1), layer)
        buffer.index_put_((layer_11, rows_B[:, None], positions_BT), rows_BTX)
    elif slots_B is None:
        rows = buffer[layer, :rows_BTX.shape[0]]
        rows.scatter_(1, positions_BT[..., None].expand_as(rows_BTX), rows_BTX)
    else:
        buffer[layer][slots_B[:, None], positions_BT] = rows_BTX
