from .block import block_dequantize, block_quantize

__all__ = ["block_dequantize", "block_quantize"]
