"""convert_to_fp8(model, cfg): FP8 training as a transform of a built model, in the style of torchtitan's float8
converter. The projections of attention and of the dense and shared-expert MLPs become FP8Linear, the routed
experts FP8Experts (the same parameters and names: checkpoints, optimizers and the other transforms see the
model unchanged). What the V3 report keeps in higher precision stays as it is: the embedding, the output head,
the MoE gates, the norms and the attention core (and the MTP modules' eh_proj, which the released checkpoints
keep in BF16 too). Apply it before the parallelism transforms and before building the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..config import Validator
from ..model.moe import Experts
from .experts import FP8Experts
from .linear import FP8Linear
from .tile import SCALE_FMTS


@dataclass
class FP8Config:
    """Attributes:
        scale_fmt: None (fp32 scales) or "ue8m0" (power-of-two scales, the V3.1/V3.2 checkpoints' format).
        experts: also run the routed experts' grouped GEMMs in FP8.
        keep: module names (the last part, e.g. "lm_head") whose linear layers stay in higher precision.
    """

    scale_fmt: str | None = None
    experts: bool = True
    keep: tuple[str, ...] = field(default_factory=lambda: ("lm_head", "embed_tokens", "gate", "eh_proj"))

    def __post_init__(self):
        v = Validator(self)
        v.one_of("scale_fmt", SCALE_FMTS)
        v.flags("experts")
        self.keep = tuple(self.keep)


def convert_to_fp8(model: nn.Module, cfg: FP8Config | None = None) -> nn.Module:
    """Swap the FP8-eligible modules' classes in place (see the module docstring); returns the model."""
    cfg = cfg or FP8Config()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if type(module) is nn.Linear and leaf not in cfg.keep and module.bias is None:
            module.__class__ = FP8Linear
            module.scale_fmt = cfg.scale_fmt
        elif type(module) is Experts and cfg.experts:
            module.__class__ = FP8Experts
            module.scale_fmt = cfg.scale_fmt
    return model
