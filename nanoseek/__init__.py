"""nanoseek: DeepSeek-V3 / R1 in compact PyTorch."""

from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import ConfigError, ModelConfig
from .infer import LLM, LLMEngine, SamplingParams
from .model import LatentCache, Transformer, build_model

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "LLM", "LLMEngine", "LatentCache", "ModelConfig", "SamplingParams",
           "Transformer", "build_model", "from_pretrained", "save_pretrained"]
