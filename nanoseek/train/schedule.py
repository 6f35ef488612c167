"""Learning-rate and coefficient schedules, as pure functions of the step (resumable by construction)."""

from __future__ import annotations

import math


def lr_at(step: int, max_steps: int, peak: float, warmup: int, kind: str = "cosine",
          min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Linear warmup, then `cosine` decay to min_ratio*peak, or `wsd` (warmup-stable-decay: constant,
    then a linear decay over the last `decay_frac` of training), or `constant`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if kind == "wsd":
        decay_start = int(max_steps * (1 - decay_frac))
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return peak * (1 - (1 - min_ratio) * progress)
    raise ValueError(f"unknown lr schedule {kind!r} (cosine, wsd, constant)")


def piecewise(step: int, max_steps: int, first: float, second: float, switch_frac: float) -> float:
    """`first` for the first switch_frac of training, then `second`: the V3 report's schedules for the MTP
    weight lambda (0.3 for the first 10T of 14.8T tokens, then 0.1) and the bias speed gamma (0.001, then 0)."""
    return first if step < switch_frac * max_steps else second
