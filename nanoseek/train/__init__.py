from .config import TrainConfig
from .trainer import Trainer, TrainingAborted, language_model_losses

__all__ = ["TrainConfig", "Trainer", "TrainingAborted", "language_model_losses"]
