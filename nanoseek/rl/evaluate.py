"""Held-out evaluation of a policy on verifiable problems: pass@1 and maj@k per task (R1 protocol).

R1 (v1 §3, v2 Supp. D.1) discourages greedy decoding for long-CoT models and reports pass@1 as the
mean correctness of k samples per problem at temperature 0.6, top-p 0.95, and cons@k / maj@k as the
correctness of the majority answer of those k samples. We do the same: every problem gets k samples
from the engine (one request with n = k), each sample's final answer is extracted with the strict
`final_answer` rule of the rewards (so evaluation and the GRPO reward can never disagree on what
the answer was) and checked by the task's checker or math-verify.

maj@k votes over the answer strings with whitespace removed; samples without an answer do not vote;
ties go to the answer seen first. Two textually different correct answers (e.g. two countdown
expressions) split the vote, so maj@k is conservative on tasks with many correct answers.
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import torch

from ..checkpoint import from_pretrained
from ..config import Validator
from ..infer import LLM, RequestOutput, SamplingParams
from ..runtime import local_device
from .data import TEMPLATES, Problem, prompt_ids, question_of, task_of
from .rewards import final_answer, format_reward, is_correct


@dataclass
class EvalConfig:
    """How a policy is evaluated.

    Attributes:
        k: samples per problem (pass@1 is their mean correctness; maj@k votes over them).
        temperature, top_p: sampling settings (R1: 0.6 and 0.95).
        max_new_tokens: generation budget per sample; a truncated sample has no answer.
        template: prompt template, "chat" or "r1_zero" (a base model is evaluated with the template it
            was pretrained on).
        seed: seeds the samples, so two evaluations of the same model agree exactly.
        max_num_seqs: sequences the engine decodes together.
    """

    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 256
    template: str = "chat"
    seed: int = 0
    max_num_seqs: int = 64

    def __post_init__(self):
        validate_sampling(self)


def validate_sampling(cfg) -> None:
    """The checks EvalConfig and SampleConfig share; ConfigError "<Class>.<field> <rule> (got <value>)"."""
    v = Validator(cfg)
    v.ints("k", "max_new_tokens", "max_num_seqs")
    v.ints("seed", minimum=0)
    v.number("temperature", 0)
    v.number("top_p", 0, 1, open_low=True)
    v.one_of("template", TEMPLATES)


def sample_problems(model, tokenizer, problems: Sequence[Problem], cfg) -> list[RequestOutput]:
    """cfg.k samples per problem: one request with n = k and seed cfg.seed + its index, so a problem's
    samples do not depend on the others. Used by evaluation and rejection sampling.

    model: an LLM (used as is), a Transformer, or a checkpoint folder (loaded on the GPU when there is
    one). cfg: an EvalConfig or SampleConfig (k, temperature, top_p, max_new_tokens, template, seed,
    max_num_seqs). The model samples in eval mode; its train/eval mode is restored afterwards.
    """
    llm = model
    if not isinstance(llm, LLM):
        if not isinstance(model, torch.nn.Module):
            model = from_pretrained(model, device=local_device())
        llm = LLM(model, tokenizer=tokenizer, max_num_seqs=cfg.max_num_seqs, seed=cfg.seed)
    was_training = llm.model.training
    llm.model.eval()
    params = [SamplingParams(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                             seed=cfg.seed + i) for i in range(len(problems))]
    outs = llm.generate([{"prompt_token_ids": prompt_ids(p, tokenizer, cfg.template)} for p in problems], params)
    llm.model.train(was_training)
    return outs


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (whitespace-insensitive), first-seen wins ties; None if none voted."""
    votes = collections.Counter("".join(a.split()) for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a is not None and votes["".join(a.split())] == best)


def evaluate(model, tokenizer, problems: Sequence[Problem], cfg: EvalConfig | None = None,
             keep_samples: int = 2) -> dict:
    """Sample cfg.k completions per problem and score them.

    Args:
        model: a Transformer, a checkpoint folder, or an existing LLM (reused as is).
        tokenizer: the nanoseek Tokenizer of the model.
        problems: held-out problems (Examples or {"question", "answer"} dicts).
        keep_samples: sample completions kept per task for the report.

    Returns {"tasks": {task: {"pass@1", "maj@k", "format", "mean_length", "problems"}}, "k": k,
    "samples": {task: [{"question", "completion", "correct"}, ...]}}. Rates are fractions in [0, 1].
    """
    cfg = cfg or EvalConfig()
    outs = sample_problems(model, tokenizer, problems, cfg)

    per_task: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    samples: dict[str, list] = collections.defaultdict(list)
    for problem, out in zip(problems, outs):
        texts = [c.text for c in out.outputs]
        answers = [final_answer(t) for t in texts]
        correct = [is_correct(problem, a) for a in answers]
        majority = majority_answer(answers)
        stats = per_task[task_of(problem)]
        stats["pass@1"].append(sum(correct) / len(correct))
        stats["maj@k"].append(float(is_correct(problem, majority)))
        stats["format"].extend(format_reward(texts))
        stats["length"].extend(len(c.token_ids) for c in out.outputs)
        if len(samples[task_of(problem)]) < keep_samples:
            samples[task_of(problem)].append({"question": question_of(problem), "completion": texts[0],
                                              "correct": correct[0]})
    tasks = {task: {"pass@1": statistics.fmean(s["pass@1"]), "maj@k": statistics.fmean(s["maj@k"]),
                    "format": statistics.fmean(s["format"]), "mean_length": statistics.fmean(s["length"]),
                    "problems": len(s["pass@1"])}
             for task, s in sorted(per_task.items())}
    return {"tasks": tasks, "k": cfg.k, "samples": dict(samples)}


def mean_over_tasks(result: dict, metric: str = "pass@1") -> float:
    """Unweighted mean of one metric over the tasks of an `evaluate` result (NaN when empty)."""
    values = [t[metric] for t in result["tasks"].values()]
    return statistics.fmean(values) if values else math.nan
