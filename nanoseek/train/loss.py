"""Cross-entropy through the output head without whole-batch fp32 logits: `linear_cross_entropy`.

Under bf16 autocast the plain loss, `F.cross_entropy(lm_head(h).float(), labels)`, passes over tokens x vocab
values seven times besides its GEMMs: the bf16 logits, their fp32 copy, the log-softmax, and in the backward
a zero-filled gradient, the softmax's backward and the cast back to bf16. Once the logits outgrow the caches
these passes cost more than the head's three GEMMs (a 2-core CPU, 2048 tokens x 8192: 208 ms for the plain
loss's forward + backward, 110 ms here; benchmarks/README.md, "Figures cited from code"). Here the forward
goes through the rows in chunks of CHUNK_VALUES logits: a chunk's logits are turned into its share of the loss
and into their gradient, (softmax - onehot) / n, while they are in cache, and only that gradient is kept (in
bf16, the size of the bf16 logits the plain loss keeps); the backward is the head's two GEMMs on it. This is
the idea of Liger-Kernel's fused linear cross-entropy without applying the gradient in the forward, which
would need an fp32 accumulator of the head's weight gradient updated per chunk. Same loss and gradients as
the plain code up to rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import IGNORE_INDEX

CHUNK_VALUES = 1 << 19   # logits per chunk: 2 MB in fp32, cache-sized
FUSED_MIN_VALUES = 1 << 22   # below this many logits (16 MB fp32) the plain loss is as fast; it is used there


def linear_cross_entropy(h_ND: torch.Tensor, head: nn.Module, labels_N: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `head(h_ND)` against labels_N (IGNORE_INDEX skipped), as
    `F.cross_entropy(head(h).float(), labels)`. Chunked and fused (see the module doc) when autograd will need
    the gradients, the head is a bias-free nn.Linear on CPU, its GEMMs run in bf16/fp16 and the logits number at
    least FUSED_MIN_VALUES, outside torch.compile (inductor fuses the plain code itself); else the plain code.
    Measured on CPU only: in fp32 the two run alike (no casts to save), and below the size the plain code is
    faster (2048 x 524, bf16: 7.8 vs 9.8 ms). GPUs keep the plain code (not measured there)."""
    device = h_ND.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h_ND.dtype
    fused = (device == "cpu" and not torch.compiler.is_compiling() and type(head) is nn.Linear
             and head.bias is None and dtype in (torch.bfloat16, torch.float16)
             and torch.is_grad_enabled() and (h_ND.requires_grad or head.weight.requires_grad)
             and h_ND.shape[0] * head.out_features >= FUSED_MIN_VALUES)
    if not fused:
        return F.cross_entropy(head(h_ND).float(), labels_N, ignore_index=IGNORE_INDEX)
    return _FusedLinearCrossEntropy.apply(h_ND, head.weight, labels_N, dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, dtype):
        N, V = h_ND.shape[0], w_VD.shape[0]
        valid_N = labels_N != IGNORE_INDEX
        n_valid = int(valid_N.sum())
        h, w = h_ND.to(dtype), w_VD.to(dtype)
        target_N = labels_N.clamp(min=0)[:, None]
        scale_N = (valid_N / max(n_valid, 1))[:, None]
        grad_NV = torch.empty(N, V, dtype=dtype, device=h_ND.device)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        rows = max(1, CHUNK_VALUES // V)
        with torch.autocast(h_ND.device.type, enabled=False):
            for s in range(0, N, rows):
                logits, t, scale = (h[s:s + rows] @ w.t()).float(), target_N[s:s + rows], scale_N[s:s + rows]
                # log-sum-exp and softmax from one exp pass (torch.logsumexp would make its own)
                top = logits.amax(-1, keepdim=True)
                target = logits.gather(1, t)
                e = logits.sub_(top).exp_()
                total_exp = e.sum(-1, keepdim=True)
                total += ((total_exp.log() + top - target) * scale).sum()
                # d loss / d logits = (softmax - onehot) / n_valid on kept rows, 0 on ignored ones
                grad_NV[s:s + rows] = e.mul_(scale / total_exp).scatter_add_(1, t, -scale)
        ctx.save_for_backward(h, w, grad_NV)
        ctx.dtypes = (h_ND.dtype, w_VD.dtype)
        return total if n_valid else total.new_tensor(float("nan"))

    @staticmethod
    def backward(ctx, grad_out):
        h, w, grad_NV = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # the upstream gradient scales the two small products, not the (N, V) one
        return ((grad_NV @ w).to(h_dtype) * grad_out, (grad_NV.t() @ h).to(w_dtype) * grad_out, None, None)
