"""Minimal batched greedy decoding over the latent cache: prefill with the naive MLA path, then one
token per step with the absorbed path. The full engine (sampling, scheduling) builds on this."""

from __future__ import annotations

import torch

from ..model import LatentCache, Transformer


@torch.no_grad()
def greedy_generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None, compiled: bool = False) -> torch.Tensor:
    """Greedy continuation of equal-length prompts (B, T); returns (B, T + max_new_tokens) ids.

    Rows that produced `eos_token_id` keep emitting it (the batch stays rectangular). `compiled`: decode
    steps through torch.compile (see `Transformer.hidden_states`).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = input_ids.shape
    param = next(model.parameters())
    cache = LatentCache(model.cfg, B, T + max_new_tokens, dtype=param.dtype, device=param.device,
                        with_mtp=False)
    out = [input_ids]
    if max_new_tokens == 0:
        return input_ids
    logits = model(input_ids, cache=cache)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if step + 1 == max_new_tokens:
            break
        pos = torch.full((B, 1), T + step, device=input_ids.device)
        logits = model.lm_head(model.hidden_states(nxt[:, None], pos, cache, compiled=compiled)[:, -1])
    return torch.cat(out, dim=1)
