from .config import TrainConfig
from .run import TrainingAborted, TrainingRun
from .trainer import Trainer, language_model_losses

__all__ = ["TrainConfig", "Trainer", "TrainingAborted", "TrainingRun", "language_model_losses"]
