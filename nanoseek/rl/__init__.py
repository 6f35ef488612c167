"""Reinforcement learning for the R1 recipe: rule-based rewards and the GRPO objective.

- rewards.py: accuracy / format / language-consistency / length / repetition rewards with a
  TRL-style batch API, a registry and `combine` for weighted sums with per-reward logging.
- grpo_loss.py: group advantages, the clipped surrogate with k3 KL and GRPO / Dr. GRPO / DAPO
  aggregation, entropy and reflection metrics. Pure tensor functions, no model code.
- rollout.py / grpo.py: the GRPO trainer (GRPOConfig, GRPOTrainer): group sampling with the engine,
  advantages, mu updates over micro-batches, metrics, checkpoints and resume; cli_grpo.py: `nanoseek grpo`.
"""

from .grpo import GRPOConfig, GRPOTrainer
from .grpo_loss import (LOSS_TYPES, REFLECTION_WORDS, group_advantages, grpo_loss, reflection_share, token_entropy,
                        zero_variance_mask)
from .rewards import (REWARDS, CombinedReward, RewardFunction, RewardScores, accuracy_reward, combine,
                      cosine_length_reward, final_answer, format_reward, get_reward, gold_text, is_correct,
                      language_consistency_reward, math_equal, repetition_penalty_reward, soft_overlong_reward)

__all__ = ["LOSS_TYPES", "REFLECTION_WORDS", "REWARDS", "CombinedReward", "RewardFunction", "RewardScores",
           "accuracy_reward", "combine", "cosine_length_reward", "final_answer", "format_reward", "get_reward",
           "gold_text", "group_advantages", "grpo_loss", "is_correct", "language_consistency_reward", "math_equal",
           "reflection_share", "repetition_penalty_reward", "soft_overlong_reward", "token_entropy",
           "zero_variance_mask"]
__all__ += ["GRPOConfig", "GRPOTrainer"]
# sft.py / distill.py: supervised fine-tuning (completion-only loss) and dense-student distillation;
# cli_sft.py: `nanoseek sft` and `nanoseek distill`. (The sft()/distill() functions stay in their modules:
# exported here they would shadow the module names.)
from .distill import DistillConfig, Distiller, kd_loss  # noqa: E402
from .sft import SFTConfig, SFTTrainer  # noqa: E402
__all__ += ["DistillConfig", "Distiller", "SFTConfig", "SFTTrainer", "kd_loss"]
