"""Verifiable task generators shared by pretraining, SFT cold start, GRPO rewards and evaluation.

Each task makes deterministic, seeded problems with a worked solution and a programmatic checker;
train and test splits are disjoint by construction (base.split_of).
"""

from .base import SPLITS, Example, TaskSpec, parse_integer, split_of
from .countdown import countdown_check
from .expr import ExprError
from .registry import TASKS, check, generate, get_task

__all__ = ["SPLITS", "TASKS", "Example", "ExprError", "TaskSpec", "check", "countdown_check", "generate",
           "get_task", "parse_integer", "split_of"]
