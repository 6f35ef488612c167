"""nanoseek: DeepSeek-V3 / R1 in compact PyTorch."""

from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import ConfigError, ModelConfig
from .model import LatentCache, Transformer, build_model

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "LatentCache", "ModelConfig", "Transformer", "build_model",
           "from_pretrained", "save_pretrained"]
