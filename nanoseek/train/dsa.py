"""DeepSeek Sparse Attention training stages (V3.2 report §2.1; docs/design/dsa.md, "Training").

- `dense_warmup`: attention stays dense and every parameter but the indexers' is frozen; the only loss is the
  indexers' KL to the main attention, so they learn to rank tokens as dense attention weighs them.
- `sparse`: attention covers each query's index_topk selected tokens; the whole model trains on the language
  model loss, and each indexer, whose inputs are detached, on its KL restricted to the tokens it selected.
The KL terms come from an explicit `IndexerRecorder` handed to the training forward (model/indexer.py); the model
stores nothing of them.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from ..model.indexer import IndexerRecord

STAGES = ("none", "dense_warmup", "sparse")


def indexer_kl_loss(records: list[IndexerRecord]) -> torch.Tensor:
    """KL(p_t || softmax(I_t)) over the keys each record covers, averaged over queries and layers: p_t is the
    main attention's head-averaged distribution (no grad), I_t the indexer's logits (V3.2 report §2.1)."""
    losses = []
    for record in records:
        log_q = torch.log_softmax(record.logits, dim=-1).masked_fill(~record.keys, 0.0)
        p = record.target
        losses.append((torch.xlogy(p, p) - p * log_q).sum(-1).mean())
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def prepare_step(model: Transformer, stage: str) -> None:
    """Before a step of a DSA stage: the dense warm-up trains the indexers only, the sparse stage everything.
    ValueError for a model without an indexer."""
    if not model.cfg.has_indexer:
        raise ValueError(f"TrainConfig.dsa_stage {stage!r} needs a model with a DSA indexer (set index_n_heads, "
                         "index_head_dim and index_topk in TrainConfig.model)")
    for name, p in model.named_parameters():
        p.requires_grad_(stage != "dense_warmup" or ".indexer." in name)
