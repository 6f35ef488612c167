"""Rejection sampling (R1 v1 §2.3.3, v2 Supp. B.3.3): k samples per prompt, keep the good ones as SFT data.

A sample is kept only when it is
- correct: its strict final answer (rewards.final_answer) passes the task checker / math-verify;
- well formed: exactly one think block then one answer block (format_ok), and it ended by itself
  (finish_reason "stop"), not at the token budget;
- not repetitive: the share of repeated word 3-grams is at most `max_repetition` (R1 filters
  "long paragraphs" and mixed languages for readability; repetition is the failure small models show);
- new: exact duplicates (whitespace-normalized) of a kept sample for the same prompt are dropped.
At most `max_per_problem` samples are kept per problem, so easy problems do not swamp the data set.
Rows are written in the chat form of nanoseek.rl.data (the question as the user turn, the sample as
the assistant turn), ready for `nanoseek sft`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Sequence

from ..config import Validator
from ..data.r1_format import format_ok
from .data import Problem, question_of, task_of
from .evaluate import sample_problems, validate_sampling
from .rewards import final_answer, is_correct, repetition_penalty_reward


REJECT_REASONS = ("truncated", "malformed", "wrong", "repetitive", "duplicate", "over_quota")


@dataclass
class SampleConfig:
    """Rejection-sampling settings.

    Attributes:
        k: samples drawn per problem.
        temperature, top_p: sampling settings (diverse samples: temperature 1.0 by default).
        max_new_tokens: budget per sample; samples that hit it are rejected.
        max_per_problem: most samples kept per problem.
        max_repetition: largest accepted share of repeated word 3-grams (0 = no repetition at all).
        template: prompt template of the sampled model ("chat" or "r1_zero").
        seed: seeds the samples.
        max_num_seqs: sequences the engine decodes together.
    """

    k: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_per_problem: int = 2
    max_repetition: float = 0.5
    template: str = "chat"
    seed: int = 0
    max_num_seqs: int = 64

    def __post_init__(self):
        validate_sampling(self)
        v = Validator(self)
        v.ints("max_per_problem")
        v.number("max_repetition", 0, 1)


def rejection_sample(model, tokenizer, problems: Sequence[Problem],
                     cfg: SampleConfig | None = None) -> tuple[list[dict], dict]:
    """Sample, filter and deduplicate. Returns (SFT rows, stats).

    model: a Transformer, a checkpoint folder or an LLM. stats counts the samples drawn and why
    the rejected ones were rejected (a sample is counted under its first failed filter, in the
    order of REJECT_REASONS), plus the kept rows per task.
    """
    cfg = cfg or SampleConfig()
    outs = sample_problems(model, tokenizer, problems, cfg)

    stats = collections.Counter(dict.fromkeys(REJECT_REASONS, 0))
    kept_per_task: collections.Counter = collections.Counter()
    rows = []
    for problem, out in zip(problems, outs):
        seen, kept = set(), 0
        for c in out.outputs:
            stats["samples"] += 1
            text = c.text.strip()
            repetition = -repetition_penalty_reward([text])[0]
            reason = ("truncated" if c.finish_reason != "stop" else
                      "malformed" if not format_ok(text) else
                      "wrong" if not is_correct(problem, final_answer(text)) else
                      "repetitive" if repetition > cfg.max_repetition else
                      "duplicate" if " ".join(text.split()) in seen else
                      "over_quota" if kept >= cfg.max_per_problem else None)
            if reason:
                stats[reason] += 1
                continue
            seen.add(" ".join(text.split()))
            kept += 1
            kept_per_task[task_of(problem)] += 1
            answer = problem.answer if hasattr(problem, "answer") else problem["answer"]
            rows.append({"messages": [{"role": "user", "content": question_of(problem)},
                                      {"role": "assistant", "content": text}],
                         "task": task_of(problem), "answer": str(answer)})
    stats["kept"] = len(rows)
    return rows, {**stats, "kept_per_task": dict(kept_per_task), "problems": len(problems)}
