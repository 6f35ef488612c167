"""FP8 weights kept for inference: a released checkpoint's block-scaled projection and expert weights stay in
float8_e4m3fn with their 128x128 `weight_scale_inv` (a quarter of fp32's memory, half of bf16's) and are
dequantized layer by layer as the forward reaches them (docs/design/fp8.md).

`keep_fp8_weights(model, state)` turns the modules whose entries in `state` come with a scale into FP8WeightLinear
or FP8WeightExperts; `nanoseek.from_pretrained(dir, keep_fp8=True)` calls it on the meta-built model before it
assigns the state. The state dict keeps the checkpoint's names: `<linear>.weight` (FP8) and
`<linear>.weight_scale_inv`; for the stacked experts `gate_up_proj`, `gate_up_proj_scale_inv` (the gate's and the
up projection's scale grids one after the other, as each was quantized on its own) and likewise `down_proj`.

Reading `.weight` (or `.gate_up_proj`, `.down_proj`) returns the dequantized weight in the compute dtype, so code
that uses a linear layer's weight directly (the absorbed MLA's folded weights) sees the same values a fully
dequantized model holds: greedy decoding is identical. Don't cast such a model with `.to(dtype)`: the FP8 buffers
would be cast without their scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, grouped_swiglu
from .block import block_dequantize, block_dequantize_stacked
from .gemm import fp8_mm, scaled_mm_ok
from .tile import tile_quantize

SCALE = "_scale_inv"


class FP8WeightLinear(nn.Linear):
    """A bias-free linear layer whose weight is stored in FP8 with 128x128 block scales (buffers `weight`,
    `weight_scale_inv`); `.weight` is the dequantized weight in `weight_dtype`. On Hopper the forward is an FP8
    GEMM on the stored weight (not checked here: no GPU in the test machines), elsewhere dequantize + matmul."""

    weight_dtype: torch.dtype = torch.float32

    @property
    def weight(self) -> torch.Tensor:
        return block_dequantize(self._buffers["weight"], self._buffers["weight_scale_inv"], dtype=self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and scaled_mm_ok(x.device):  # Hopper: the FP8 GEMM itself, the activations in 1x128 tiles
            x_q, x_s = tile_quantize(x.reshape(-1, x.shape[-1]))
            y = fp8_mm(x_q, x_s, self._buffers["weight"], self._buffers["weight_scale_inv"], out_dtype=x.dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.weight)


class FP8WeightExperts(Experts):
    """Routed experts stored in FP8; each forward dequantizes only the experts that received tokens."""

    weight_dtype: torch.dtype = torch.float32

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return block_dequantize_stacked(self._buffers["gate_up_proj"], self._buffers["gate_up_proj" + SCALE], 2,
                                        self.weight_dtype)

    @property
    def down_proj(self) -> torch.Tensor:
        return block_dequantize_stacked(self._buffers["down_proj"], self._buffers["down_proj" + SCALE], 1,
                                        self.weight_dtype)

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        active = counts_E.nonzero().flatten()
        b = self._buffers
        w13 = block_dequantize_stacked(b["gate_up_proj"][active], b["gate_up_proj" + SCALE][active], 2, x_SD.dtype)
        w2 = block_dequantize_stacked(b["down_proj"][active], b["down_proj" + SCALE][active], 1, x_SD.dtype)
        return grouped_swiglu(x_SD, counts_E[active].cumsum(0).to(torch.int32), w13, w2)


def _as_buffers(module: nn.Module, names: tuple[str, ...], state: dict, prefix: str) -> list[str]:
    placed = []
    for name in names:  # straight into _buffers: register_buffer would read the dequantizing property first
        del module._parameters[name]
        for key in (name, name + SCALE):
            module._buffers[key] = state[prefix + key]
            placed.append(prefix + key)
    return placed


def keep_fp8_weights(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> set[str]:
    """Make every bias-free nn.Linear and Experts module of `model` whose weights in `state` have a scale entry
    hold them in FP8 (the tensors of `state`, registered as buffers; `dtype` is what they dequantize to).
    Returns the keys of `state` placed that way: load the rest with load_state_dict, whose setattr would read
    (and dequantize) the `.weight` property of every converted module."""
    placed: set[str] = set()
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if type(module) is nn.Linear and prefix + "weight" + SCALE in state and module.bias is None:
            module.__class__ = FP8WeightLinear
            placed.update(_as_buffers(module, ("weight",), state, prefix))
        elif type(module) is Experts and prefix + "gate_up_proj" + SCALE in state:
            module.__class__ = FP8WeightExperts
            placed.update(_as_buffers(module, ("gate_up_proj", "down_proj"), state, prefix))
        else:
            continue
        module.weight_dtype = dtype
    return placed
