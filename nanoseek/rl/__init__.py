"""The R1 recipe: rewards, SFT, GRPO, rejection sampling, distillation, evaluation and the r1 pipeline.

- data.py: problems (built-in tasks, user jsonl/parquet), chat / R1-Zero prompts, SFT rows on disk.
- rewards.py: accuracy / format / language-consistency / length / repetition / equation rewards with a TRL-style
  batch API, a registry and `combine` for weighted sums with per-reward logging.
- grpo_loss.py: group advantages, the clipped surrogate with k3 KL and GRPO / Dr. GRPO / DAPO
  aggregation, entropy and reflection metrics. Pure tensor functions, no model code.
- rollout.py / grpo.py: the GRPO trainer: group sampling with the engine, mu updates, metrics, resume.
- sft_data.py / sft.py: supervised fine-tuning with a completion-only loss; distill.py: dense students.
- sample.py: rejection sampling; evaluate.py: held-out pass@1 / maj@k.
- pipeline.py / report.py: `nanoseek r1`, every stage in order, with report.md and report.json.
- cli_sft.py, cli_grpo.py, cli_r1.py: the command-line stages.
The sft()/distill() convenience functions stay in their modules (exported here they would shadow
the module names).
"""

from .distill import DistillConfig, Distiller, kd_loss
from .evaluate import EvalConfig, evaluate
from .grpo import GRPOConfig, GRPOTrainer
from .grpo_loss import (LOSS_TYPES, REFLECTION_WORDS, group_advantages, grpo_loss, reflection_share, token_entropy,
                        zero_variance_mask)
from .pipeline import STAGES, R1Config, R1Pipeline
from .rewards import (REWARDS, CombinedReward, RewardFunction, RewardScores, accuracy_reward, combine,
                      cosine_length_reward, equation_reward, equations, final_answer, format_reward, get_reward,
                      gold_text, is_correct, language_consistency_reward, math_equal, repetition_penalty_reward,
                      soft_overlong_reward)
from .sample import SampleConfig, rejection_sample
from .sft import SFTConfig, SFTTrainer

__all__ = ["LOSS_TYPES", "REFLECTION_WORDS", "REWARDS", "STAGES", "CombinedReward", "DistillConfig", "Distiller",
           "EvalConfig", "GRPOConfig", "GRPOTrainer", "R1Config", "R1Pipeline", "RewardFunction", "RewardScores",
           "SFTConfig", "SFTTrainer", "SampleConfig", "accuracy_reward", "combine", "cosine_length_reward",
           "equation_reward", "equations", "evaluate", "final_answer", "format_reward", "get_reward", "gold_text",
           "group_advantages", "grpo_loss", "is_correct", "kd_loss", "language_consistency_reward", "math_equal",
           "reflection_share", "rejection_sample", "repetition_penalty_reward", "soft_overlong_reward",
           "token_entropy", "zero_variance_mask"]
