from .cache import LatentCache
from .transformer import MTP, Block, Transformer, build_model

__all__ = ["Block", "LatentCache", "MTP", "Transformer", "build_model"]
