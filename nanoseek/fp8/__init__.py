"""FP8: DeepSeek-V3's fine-grained recipe for training (1x128 activation tiles, 128x128 weight blocks, E4M3,
fp32 accumulation; docs/design/fp8.md) and the released checkpoints' block-scaled weights."""

from .block import block_dequantize, block_quantize
from .tile import tile_dequantize, tile_quantize

__all__ = ["block_dequantize", "block_quantize", "tile_dequantize", "tile_quantize"]
