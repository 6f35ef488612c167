"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2; docs/design/dsa.md).

Per layer, a few small heads score every past token s for each query t (V3.2 report eq. 1):

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])        w = weights_proj(h_t), one key k[s] per token

and MLA attends only to the index_topk highest-scoring visible tokens. Shapes follow DeepSeek-V3.2-Exp's
inference `Indexer`: the query heads come from MLA's normalized query latent c_Q (`wq_b`), the key is one
LayerNorm-ed vector per token (`wk`, `k_norm`), both `[rope ; nope]` with the RoPE part first and rotated
half-split (pairs (x_j, x_{j+R/2})), not interleaved as in MLA: DeepSeek's later correction, which HF
transformers follows. Scores are computed in fp32 without the Hadamard rotation and FP8 rounding of the
official kernel (an exact rotation and a storage format: the scores are the same up to rounding).

Choices:
- The indexer never backpropagates into the model: MLA hands it detached inputs (the V3.2 sparse stage), so its
  only training signal is the KL loss a training forward collects through an `IndexerRecorder`.
- Selection is top-k over visible keys only; a query with fewer than k visible keys gets all of them, so with
  index_topk >= the context length attention is exactly dense MLA (and the selection is skipped).
- Long inputs are scored in query chunks, so memory stays O(chunk x keys) instead of O(T x keys x heads).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

_CHUNK_ELEMENTS = 1 << 25  # scores held at once by a chunked (inference) selection: 128 MB of fp32


def apply_rope_half(x: torch.Tensor, cos_BTP: torch.Tensor, sin_BTP: torch.Tensor) -> torch.Tensor:
    """Rotate the half-split pairs (x_j, x_{j+P}) of x (B, T, [H,] 2P) by cos/sin (B, T, P) (NeoX style); fp32 math."""
    if x.dim() == 4:
        cos_BTP, sin_BTP = cos_BTP[:, :, None], sin_BTP[:, :, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos_BTP - x2 * sin_BTP, x2 * cos_BTP + x1 * sin_BTP], dim=-1).to(x.dtype)


class IndexerRecord(NamedTuple):
    """One attention layer's indexer in one training forward.

    logits: I (B, T, S) fp32 with grad to the indexer only, -inf outside `keys`;
    target: the main attention's probabilities summed over heads and L1-normalized (B, T, S), no grad;
    keys: (B, T, S) bool, the keys both distributions cover (visible ones in the dense warm-up, the selected
    ones in the sparse stage)."""
    layer: int
    logits: torch.Tensor
    target: torch.Tensor
    keys: torch.Tensor


class IndexerRecorder:
    """An explicit collector handed to a training forward (`Transformer.hidden_states(..., recorder=r)`): every
    layer with an indexer appends an IndexerRecord, which the trainer turns into the indexer's KL loss.

    Args:
        dense: attention stays dense (the V3.2 dense warm-up: the indexer learns to imitate dense attention);
            otherwise attention is sparse as usual and the records cover the selected tokens only.
    """

    def __init__(self, dense: bool = False):
        self.dense = dense
        self.records: list[IndexerRecord] = []

    def record(self, layer: int, logits: torch.Tensor, target: torch.Tensor, keys: torch.Tensor) -> None:
        self.records.append(IndexerRecord(layer, logits, target, keys))

    def take(self) -> list[IndexerRecord]:
        """The records since the last take (which drops them)."""
        records, self.records = self.records, []
        return records


class Indexer(nn.Module):
    """The lightning indexer of one layer; its tensors load under `self_attn.indexer.*` (V3.2 checkpoint names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def keys(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The cached key of each token (B, T, index_head_dim): LayerNorm(wk x), RoPE on its first part."""
        k = self.k_norm(self.wk(x_BTD))
        return torch.cat([apply_rope_half(k[..., :self.rope], cos, sin), k[..., self.rope:]], dim=-1)

    def logits(self, x_BTD: torch.Tensor, q_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys_BSK: torch.Tensor, visible_BTS: torch.Tensor) -> torch.Tensor:
        """I (B, T, S) in fp32: sum_j w_tj ReLU(q_tj . k_s) over the heads j, -inf where a key is not visible.

        w_tj = weights_proj(x_t)_j * n_heads^-0.5 * head_dim^-0.5 (the scales HF and the official code apply)."""
        B, T, _ = x_BTD.shape
        H, K = self.n_heads, self.head_dim
        q = self.wq_b(q_in).view(B, T, H, K)
        q = torch.cat([apply_rope_half(q[..., :self.rope], cos, sin), q[..., self.rope:]], dim=-1)
        w_BTH = F.linear(x_BTD.float(), self.weights_proj.weight.float()) * (H ** -0.5 * K ** -0.5)
        s_BMS = torch.bmm(q.float().view(B, T * H, K), keys_BSK.float().transpose(1, 2))    # rows (t, j)
        s_BMS = F.relu(s_BMS) if torch.is_grad_enabled() else s_BMS.relu_()
        i_NS = torch.bmm(w_BTH.view(B * T, 1, H), s_BMS.view(B * T, H, -1)).view(B, T, -1)
        return i_NS.masked_fill(~visible_BTS, float("-inf"))

    def top(self, logits_BTS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k = min(index_topk, S) best keys of each query (B, T, k), and which of them are visible (a query
        with fewer than k visible keys also gets some masked ones). In no particular order: every use is a set."""
        top = logits_BTS.topk(min(self.topk, logits_BTS.shape[-1]), dim=-1, sorted=False)
        return top.indices, top.values > float("-inf")

    @torch.no_grad()
    def select(self, x_BTD: torch.Tensor, q_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys_BSK: torch.Tensor, q_pos_BT: torch.Tensor, k_pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`top` of the logits of queries at q_pos_BT over keys at k_pos_BS (B or 1, S), a key being visible at
        a position <= the query's. Scored in query chunks, so memory stays bounded for long inputs; with keys in
        position order (prefill, the cache), a chunk scores only the keys its last query can see, which halves
        a prefill's indexer work."""
        B, T, _ = x_BTD.shape
        S = keys_BSK.shape[1]
        k = min(self.topk, S)
        if torch.compiler.is_compiling():  # decode steps: one chunk, and no shape arithmetic to guard on
            visible_BTS = k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
            return self.top(self.logits(x_BTD, q_in, cos, sin, keys_BSK, visible_BTS))
        chunk = max(1, _CHUNK_ELEMENTS // max(1, B * S * self.n_heads))
        ordered = bool((k_pos_BS[:, 1:] >= k_pos_BS[:, :-1]).all())
        idx, valid = [], []
        for t in range(0, T, chunk):
            c = slice(t, t + chunk)
            n = int((k_pos_BS <= q_pos_BT[:, c].max()).sum(-1).max()) if ordered else S
            visible_BTS = k_pos_BS[:, None, :n] <= q_pos_BT[:, c, None]
            i, v = self.top(self.logits(x_BTD[:, c], q_in[:, c], cos[:, c], sin[:, c], keys_BSK[:, :n], visible_BTS))
            if i.shape[-1] < k:   # fewer keys than k in reach: pad with masked entries
                i, v = F.pad(i, (0, k - i.shape[-1])), F.pad(v, (0, k - v.shape[-1]))
            idx.append(i)
            valid.append(v)
        return (idx[0], valid[0]) if len(idx) == 1 else (torch.cat(idx, 1), torch.cat(valid, 1))


def selection_mask(idx_BTK: torch.Tensor, valid_BTK: torch.Tensor, keys: int) -> torch.Tensor:
    """(B, T, keys) bool: True at the selected visible keys."""
    mask = torch.zeros(*idx_BTK.shape[:2], keys, dtype=torch.bool, device=idx_BTK.device)
    return mask.scatter_(-1, idx_BTK, valid_BTK)
