"""Rotary position embedding with YaRN context extension (docs/design/rope.md).

The decoupled RoPE parts of MLA rotate *adjacent pairs* (x0, x1), (x2, x3), ... as in DeepSeek's
official code and the released checkpoints; no weight permutation is needed on load.
YaRN follows HF semantics: per-frequency interpolation with a linear ramp, and the cos/sin
magnitude mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for every released config);
the mscale_all_dim^2 softmax factor lives in `ModelConfig.softmax_scale`.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig, yarn_get_mscale


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (qk_rope_head_dim / 2,) and the cos/sin magnitude."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # on the CPU whatever the default device (a model built on the meta device still gets real tables)
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor, original = rs["factor"], rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:  # the pair index whose wavelength fits `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rs["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    # ramp 0: high-frequency pairs keep their frequency (extrapolate); ramp 1: divided by the factor.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        magnitude = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        magnitude = yarn_get_mscale(factor)
    return inv_freq, magnitude


class RotaryEmbedding(torch.nn.Module):
    """Computes (cos, sin) of shape (B, T, qk_rope_head_dim / 2) for integer positions (B, T)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.reset("cpu")

    def reset(self, device: torch.device | str) -> None:
        """(Re)compute the table on `device`. A plain fp32 attribute, not a buffer: model.to(bfloat16) must not
        round the frequencies."""
        inv_freq, self.magnitude = rope_inv_freq(self.cfg)
        self.inv_freq = inv_freq.to(device)

    def forward(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions_BT[..., None].float() * self.inv_freq.to(positions_BT.device)
        return angles.cos() * self.magnitude, angles.sin() * self.magnitude


def apply_rope(x: torch.Tensor, cos_BTP: torch.Tensor, sin_BTP: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, [H,] 2P); cos/sin (B, T, P). Computed in fp32.

    As one complex product (x0 + i x1)(cos + i sin), DeepSeek's formulation: 4 ops instead of ~12 for
    the real-arithmetic version, which matters at decode where every op is overhead (equal in fp32).
    Under torch.compile, which generates no code for complex ops, the real version (fused there anyway)."""
    if x.dim() == 4:  # per-head tensor: broadcast over heads
        cos_BTP, sin_BTP = cos_BTP[:, :, None], sin_BTP[:, :, None]
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        x0, x1 = pairs.unbind(-1)
        return torch.stack([x0 * cos_BTP - x1 * sin_BTP, x0 * sin_BTP + x1 * cos_BTP], -1).flatten(-2).to(x.dtype)
    if pairs.stride(-2) % 2 or pairs.storage_offset() % 2:  # a complex view needs 8-byte-aligned pairs
        pairs = pairs.contiguous()
    out = torch.view_as_complex(pairs) * torch.complex(cos_BTP, sin_BTP)
    return torch.view_as_real(out).flatten(-2).to(x.dtype)
