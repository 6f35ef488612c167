"""The model side of the engine: one preallocated LatentCache (with DSA, the indexer keys too) and the batched
forwards on it.

- prefill: right-padded prompts from position 0 through the naive MLA path (cheap in FLOPs). The junk
  latents written past a short prompt are overwritten before any query can see them.
- decode/verify: a few tokens per row at each row's own positions through the absorbed path; the
  position mask lets rows of different lengths (cache slots) share one forward. Optionally compiled.
- mtp: the MTP module over its own cache layer (`num_hidden_layers + k`), for speculative drafts.
Everything runs under torch.inference_mode; the cache is created there too.
"""

from __future__ import annotations

import torch

from ..model import LatentCache, Transformer


class ModelRunner:
    """Args:
        model: the Transformer (put in eval mode).
        num_slots, max_len: cache rows (concurrent sequences) and tokens per row.
        cache_dtype: dtype of the cached latents (default: the model's).
        with_mtp: also cache the MTP modules' layers.
        compile: decode and verification forwards through torch.compile (`Transformer.hidden_states`).
    """

    def __init__(self, model: Transformer, num_slots: int, max_len: int, cache_dtype: torch.dtype | None = None,
                 with_mtp: bool = False, compile: bool = False):
        self.model = model.eval()
        self.compile = compile
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        with torch.inference_mode():
            self.cache = LatentCache(model.cfg, num_slots, max_len, dtype=cache_dtype or param.dtype,
                                     device=self.device, with_mtp=with_mtp)

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _slots(self, slots: list[int]) -> torch.Tensor | None:
        """None for slots 0..B-1 in order (the cache then reads views, not gathered copies)."""
        return None if slots == list(range(len(slots))) else self._tensor(slots)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Hidden states (B, T, D) of right-padded prompts written into cache rows `slots`."""
        T = max(map(len, prompts))
        ids = self._tensor([p + [0] * (T - len(p)) for p in prompts])
        positions = torch.arange(T, device=self.device).expand(len(prompts), T)
        return self.model.hidden_states(ids, positions, self.cache, self._slots(slots), absorb=False)

    @torch.inference_mode()
    def forward(self, ids: list[list[int]], starts: list[int], slots: list[int]) -> torch.Tensor:
        """Hidden states (B, T, D) of T new tokens per row at positions start..start+T-1, over the cache."""
        ids_BT = self._tensor(ids)
        positions = self._tensor(starts)[:, None] + torch.arange(ids_BT.shape[1], device=self.device)
        return self.model.hidden_states(ids_BT, positions, self.cache, self._slots(slots), absorb=True,
                                        compiled=self.compile)

    @torch.inference_mode()
    def mtp(self, h_BTD: torch.Tensor, next_ids: list[list[int]], starts: list[int], slots: list[int],
            absorb: bool = True, k: int = 0) -> torch.Tensor:
        """Logits (B, T, V) of MTP module k: row b, step t sees main hidden h[b, t] at position start + t
        and the token that followed it, and predicts the token after that."""
        ids_BT = self._tensor(next_ids)
        positions = self._tensor(starts)[:, None] + torch.arange(ids_BT.shape[1], device=self.device)
        _, logits = self.model.mtp_step(k, h_BTD, ids_BT, positions, self.cache, self._slots(slots), absorb=absorb)
        return logits.float()

    @torch.inference_mode()
    def mtp_fill(self, h_BTD: torch.Tensor, next_ids: list[list[int]], slots: list[int], k: int = 0) -> None:
        """Write MTP module k's latents for positions 0..T-1 (a prefill); no logits are computed."""
        ids_BT = self._tensor(next_ids)
        positions = torch.arange(ids_BT.shape[1], device=self.device).expand_as(ids_BT)
        self.model.mtp_step(k, h_BTD, ids_BT, positions, self.cache, self._slots(slots), absorb=False, logits=False)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Share a prefilled prompt: copy the first `length` cached tokens of row src into row dst (all layers)."""
        self.cache.copy_slot(src, dst, length)
