"""GRPO training for the R1 recipe (DeepSeekMath §4.1; R1 v2 §2.1; docs/design/grpo_sources.md): sample a
group of G completions per prompt, score them with rule rewards, normalise the rewards within the
group, and take clipped policy-gradient steps with an optional k3 KL to a frozen reference.

One step = rollout (nanoseek.rl.rollout: the inference engine with its latent cache, batched over all
prompts of the step) -> rewards (nanoseek.rl.rewards, each function logged separately) -> advantages
(grpo_loss.group_advantages) -> `mu` optimizer steps over the same samples, each accumulating
gradients over micro-batches of `micro_batch` completions (grpo_loss.grpo_loss).

Key choices (defaults in GRPOConfig, reasons next to each field):
- With mu = 1 the "old" policy is the current one: old log-probs are the detached current ones and no
  extra forward runs (the ratio is exactly 1; the loss is then group-baselined REINFORCE, TRL's and
  nanochat's fast path). With mu > 1 the old log-probs come from one no-grad forward before the first
  update, so later passes see ratio != 1 and the clip acts.
- Micro-batches combine into exactly the full-batch loss: "dapo" divides every micro-batch's token sum
  by the completion tokens of the whole step; "grpo"/"dr_grpo" scale each micro-batch's mean by its
  share of the rows.
- Zero-variance groups (all G rewards equal) have advantage 0. `filter_zero_variance` drops them from
  the update (saves their forward/backward and keeps them out of the "dapo" token count). With
  `dynamic_sampling` > 0 the step then samples replacement prompts, up to that many extra rounds, until
  `prompts_per_step` groups with reward variance are in hand (DAPO §3.2); the update takes the first
  that many. Otherwise a step may train on fewer groups.
- Outcome rewards give every token of a completion the same advantage, so a right step inside a wrong
  solution is pushed down with it; for the miniature models, whose arithmetic facts are uncertain, that
  measurably unlearns facts (docs/r1_report.md). `equation_credit` adds process supervision from a rule
  instead of a reward model: every "A = B" the completion writes is checked exactly (and must use numbers
  from the question or from earlier results, or a weak policy learns to write true but idle equations),
  and DeepSeekMath's normalised step rewards (§4.1.3) go to that equation's tokens only, not to every
  earlier token (its A_{i,t} = sum of the rewards of the steps ending at or after t), because each
  equation here is checkable on its own.
- `positive_only` keeps only the completions the group baseline marks better than average (RAFT++):
  pushing a sampled token down raises every other token of the vocabulary, and for a tiny policy whose
  facts are uncertain that was a suspect for the unlearning above. Measured, it does not prevent it
  (docs/r1_report.md), so it is off by default.
- The problem order is a pure function of (seed, step) (refills: of (seed, step, round), from a stream of
  their own) and every request has its own sampling seed, so a resumed run repeats exactly what the
  uninterrupted one would have done.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..checkpoint import from_pretrained
from ..config import ConfigError, Validator, is_number, load_config
from ..data.tokenizer import Tokenizer
from ..infer import LLM, prompt_opens_think
from ..machine import COMPILE_CHOICES
from ..model.buckets import length_bucket_limit
from ..runtime import is_main_process
from ..train.metrics import read_jsonl
from ..train.run import TrainingRun
from ..train.schedule import lr_at
from ..train.state import save_model_dir
from .data import TEMPLATES, load_problems, prompt_ids, prompt_text, question_of, task_examples, task_of
from .grpo_loss import (LOSS_TYPES, group_advantages, grpo_loss, reflection_share, step_advantages,
                        zero_variance_mask)
from .rewards import REWARDS, RewardFunction, RewardScores, accuracy_reward, combine, equation_spans, get_reward
from .rollout import Rollout, completion_logprobs, pad_batch, sample_groups, sync_engine

SCALE_REWARDS = ("group", "batch", "none")
GRPO_PRECISIONS = ("auto", "float32", "bf16")
RECHECK_WORDS = ("wait", "check")  # the issue's narrow "re-check" signal; reflection_share uses R1's ten words


@dataclass
class GRPOConfig:
    """GRPO settings. Defaults: a CPU run on the built-in tasks for a ~10M-parameter SFT'd model.

    Attributes:
        tasks: built-in task generators (nanoseek.data.tasks) used when `data` is empty.
        difficulty: task difficulty (None: each task's default).
        n_train_problems: problems generated per task (train split).
        data: jsonl/parquet problem files ({"question", "answer"}, see rl.data.load_problems); replaces `tasks`.
        template: prompt template, "chat" (after SFT) or "r1_zero" (a base model, R1 Table 1).
        rewards: {reward name: weight}; R1-Zero: accuracy + format with equal weights (R1 v2 eq. 4).
        reward_params: {reward name: {parameter: value}} bound with rewards.get_reward.
        steps: optimizer "steps" = rollouts (each does `mu` optimizer updates).
        prompts_per_step: prompts sampled per step (R1-Zero: 32).
        group_size: G, completions per prompt (TRL's default 8; R1-Zero 16).
        max_new_tokens: longest completion; also Dr. GRPO's constant normaliser.
        temperature, top_p: rollout sampling (R1-Zero: T = 1; top_p 1 keeps sampling = the policy).
        lr: AdamW peak LR. 4e-5 = ~1.4% of the `small` preset's pretraining peak (3e-3), the ratio of
            R1-Zero's 3e-6 to V3's pretraining peak 2.2e-4; RL LRs sit 1-2 orders below pretraining.
        lr_schedule: "constant" (DAPO, Dr. GRPO), "cosine" or "wsd" (train.schedule.lr_at) after warmup.
        warmup: linear warmup steps (DAPO: 20 at its scale; 0 here for short runs).
        weight_decay, betas: AdamW (TRL: no decay; betas of Dr. GRPO, 0.9/0.95).
        grad_clip: global-norm clip (Dr. GRPO: 1.0; 0 disables).
        mu: optimizer updates per rollout (DeepSeekMath's mu, TRL num_iterations); 1 = on-policy.
        micro_batch: completions per forward/backward (memory knob; does not change the loss).
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (DAPO Clip-Higher: 0.2 / 0.28). Acts only
            when mu > 1.
        beta: k3 KL coefficient to the frozen initial model (0: TRL/DAPO/Dr. GRPO default, and no
            reference model is loaded; R1-Zero used 0.001).
        loss_type: "dapo" (token-level mean over the step; TRL's default since 2025, no length bias),
            "grpo" (per-sequence mean, DeepSeekMath eq. 3) or "dr_grpo" (sum / (rows x max_new_tokens)).
        scale_rewards: advantage std scaling: "group" (GRPO, TRL default), "batch" (the batch std) or
            "none" (Dr. GRPO: r - group mean). The std is the sample std, as TRL's.
        filter_zero_variance: drop groups whose rewards are all equal from the update (see module doc).
        equation_credit: weight of per-step credit from the rule check of each integer equation in a completion
            (rewards.equation_spans, grounded in the question; 0 disables): step reward 1 if it holds, else 0,
            normalised over the group's steps (DeepSeekMath §4.1.3 process supervision) and added, times this
            weight, to the outcome advantage of that equation's tokens only. A group then carries a learning
            signal when its outcomes or its steps differ. See the module doc.
        dynamic_sampling: with filter_zero_variance, up to this many extra rollout rounds per step that sample
            replacement prompts for the dropped groups (DAPO's dynamic sampling); 0 disables. Each round
            samples as many prompts as are still missing, divided by the share of groups kept so far.
        mask_truncated: exclude completions cut at max_new_tokens from the loss (DAPO overlong filtering).
        positive_only: train only on what the group baseline marks better than average: completions with a
            negative advantage are left out of the update and negative token advantages become 0 (RAFT++,
            Xiong et al. 2025: online rejection sampling with GRPO's baseline). See the module doc.
        max_num_seqs: sequences the engine decodes at once (0: all of a step, prompts_per_step x G).
        precision: the update's forward/backward: "float32", "bf16" (autocast over fp32 weights) or "auto" (bf16
            where this machine's bf16 GEMMs are faster; nanoseek/machine.py). The rollouts decode in the weights'
            fp32 either way, and with mu > 1 the old log-probs come from the update's precision, so the first
            pass's ratio stays exactly 1.
        compile_rollouts: decode the rollouts through torch.compile (`LLM(compile=True)`): True, False or "auto"
            (the `nanoseek grpo` default: a probe measures once per machine whether compiled decode steps are
            faster here and whether this run has enough of them to recoup the compile; nanoseek/machine.py). The
            first step compiles (about a minute on 2 CPU cores); later decode steps run fused kernels, which made
            rollouts 20-25% faster on one CPU and no faster on another (benchmarks/README.md).
        save_every: steps between checkpoints (0: only at the end); keep_checkpoints: how many to keep.
        seed: problem order, sampling seeds.
        threads: torch CPU threads (0: torch's default).
        device: "cpu", "cuda", ... (None: cuda when available).
        tensorboard: also write TensorBoard scalars next to metrics.jsonl.
    """

    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "countdown", "linear"])
    difficulty: int | None = None
    n_train_problems: int = 1000
    data: list[str] = field(default_factory=list)
    template: str = "chat"
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    reward_params: dict[str, dict] = field(default_factory=dict)
    steps: int = 200
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 4e-5
    lr_schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    mu: int = 1
    micro_batch: int = 16
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    filter_zero_variance: bool = True
    equation_credit: float = 0.0
    dynamic_sampling: int = 0
    mask_truncated: bool = False
    positive_only: bool = False
    max_num_seqs: int = 0
    precision: str = "float32"
    compile_rollouts: bool | str = False
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    threads: int = 0
    device: str | None = None
    tensorboard: bool = True

    def __post_init__(self):
        v = Validator(self)
        v.ints("n_train_problems", "steps", "prompts_per_step", "group_size", "max_new_tokens", "mu", "micro_batch",
               "keep_checkpoints")
        v.ints("warmup", "max_num_seqs", "save_every", "threads", "seed", "dynamic_sampling", minimum=0)
        v.require(self.group_size >= 2, "group_size", "must be >= 2 (advantages compare completions within a group)")
        v.require(self.max_num_seqs == 0 or self.max_num_seqs >= self.group_size, "max_num_seqs",
                  f"must be 0 or >= group_size ({self.group_size}): a group decodes at once")
        v.require(isinstance(self.tasks, list) and all(isinstance(t, str) for t in self.tasks), "tasks",
                  "must be a list of task names")
        v.paths("data")
        v.require(bool(self.tasks) or bool(self.data), "tasks", "must not be empty when no data files are given")
        v.ints("difficulty", optional=True)
        v.one_of("template", TEMPLATES)
        v.require(isinstance(self.rewards, dict) and bool(self.rewards), "rewards", "must be a non-empty {name: weight}")
        for name, w in self.rewards.items():
            v.require(isinstance(name, str) and is_number(w), "rewards", f"needs a finite number weight for {name!r}")
        v.require(isinstance(self.reward_params, dict) and all(isinstance(p, dict) for p in self.reward_params.values()),
                  "reward_params", "must be {reward name: {parameter: value}}")
        unused = set(self.reward_params) - set(self.rewards)
        v.require(not unused, "reward_params", f"names rewards that are not in `rewards`: {sorted(unused)}")
        v.number("temperature", 0, open_low=True)
        v.number("top_p", 0, 1, open_low=True)
        v.number("lr", 0, open_low=True)
        v.one_of("lr_schedule", ("constant", "cosine", "wsd"))
        v.number("weight_decay", 0)
        self.betas = tuple(self.betas)
        v.require(len(self.betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in self.betas), "betas",
                  "must be two numbers in [0, 1)")
        v.number("grad_clip", 0)
        v.number("eps_low", 0, 1, open_high=True)
        for name in ("eps_high", "beta", "equation_credit"):
            v.number(name, 0)
        v.one_of("loss_type", LOSS_TYPES)
        v.one_of("precision", GRPO_PRECISIONS)
        v.one_of("scale_rewards", SCALE_REWARDS)
        v.flags("filter_zero_variance", "mask_truncated", "positive_only", "tensorboard")
        v.one_of("compile_rollouts", COMPILE_CHOICES.values())

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, defaults: dict | None = None, **overrides) -> "GRPOConfig":
        """Defaults <- `defaults` <- JSON/TOML file <- overrides (None values are ignored)."""
        return load_config(cls, path, overrides, defaults)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class GRPOTrainer:
    """Args:
        cfg: the settings.
        init: HF-format model folder with tokenizer files (e.g. `nanoseek sft` output); also the frozen
            reference when cfg.beta > 0.
        out: output folder: metrics.jsonl, checkpoints/, model/ (final policy + tokenizer), reward.png, length.png.
        resume: continue from the newest complete checkpoint in out/checkpoints.
        progress: show a progress bar.
        reward_fns: extra reward functions {name: fn(completions, examples, **kwargs) -> list[float]};
            their weight is cfg.rewards[name] when given, else 1.0. They override built-ins of the same name.
    """

    def __init__(self, cfg: GRPOConfig, init: str, out: str, resume: bool = False, progress: bool = True,
                 reward_fns: Mapping[str, RewardFunction] | None = None):
        self.cfg, self.init, self.out = cfg, os.fspath(init), os.fspath(out)
        if not os.path.isdir(self.init):
            raise FileNotFoundError(f"--init {self.init!r} is not a folder (expected an HF-format checkpoint)")
        # under torchrun: data parallel with whole weights on every rank, so each rank's engine samples from its
        # own copy; every rank rolls out its share of the step's prompts (see `_rollout_shared`)
        self.run = run = TrainingRun(self.out, seed=cfg.seed, device=cfg.device, threads=cfg.threads, resume=resume,
                                     progress=progress, label="grpo", keep_checkpoints=cfg.keep_checkpoints,
                                     tensorboard=cfg.tensorboard, replicate=True)
        if run.parallel is not None:
            dp = run.parallel.dims.dp
            if cfg.prompts_per_step % dp:
                raise ConfigError(f"GRPOConfig.prompts_per_step {cfg.prompts_per_step} must be a multiple of the "
                                  f"{dp} processes: each rolls out an equal share of the step's prompts")
            if cfg.dynamic_sampling:
                raise ConfigError("GRPOConfig.dynamic_sampling is not supported with several processes yet")
        self.tokenizer = Tokenizer.load(self.init)
        model = from_pretrained(run.checkpoint or self.init, dtype=torch.float32, device=run.device)
        self.ref = None
        if cfg.beta > 0:  # the frozen initial policy; with beta = 0 none is loaded at all (TRL)
            self.ref = from_pretrained(self.init, dtype=torch.float32, device=run.device).eval().requires_grad_(False)
        self.reward = self._build_rewards(reward_fns or {})
        self.model = model
        self.problems, self.prompts = self._build_problems()
        self.think_opened = prompt_opens_think(prompt_text(self.problems[0], self.tokenizer, cfg.template))
        run.attach(model, self.tokenizer, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                   grad_clip=cfg.grad_clip)
        self.precision = run.resolve_precision(cfg.precision)
        # bf16 on CPU: scoring batches padded to bucketed lengths (nanoseek/model/buckets.py)
        self.bucket_limit = length_bucket_limit(self.precision, run.device, model.cfg.max_position_embeddings)
        # one engine for the whole run; it holds self.model itself, so updates are sampled from at once
        max_len = max(map(len, self.prompts)) + cfg.max_new_tokens
        # "auto": decode steps of the run at most steps x max_new_tokens (per refill round too)
        compile_rollouts = run.resolve_compile_rollouts(cfg.compile_rollouts,
                                                        cfg.steps * (1 + cfg.dynamic_sampling) * cfg.max_new_tokens)
        self.llm = LLM(self.model, self.tokenizer, max_num_seqs=cfg.max_num_seqs or cfg.prompts_per_step * cfg.group_size,
                       max_model_len=max_len, seed=cfg.seed, compile=compile_rollouts)

    # ---- setup ----------------------------------------------------------------------------------
    def _build_rewards(self, extra: Mapping[str, RewardFunction]):
        cfg = self.cfg
        unknown = [n for n in cfg.rewards if n not in REWARDS and n not in extra]
        if unknown:
            raise ValueError(f"GRPOConfig.rewards: unknown reward(s) {unknown}; built-in: {sorted(REWARDS)}, "
                             f"passed in: {sorted(extra)}")
        fns = {n: extra[n] if n in extra else get_reward(n, **cfg.reward_params.get(n, {})) for n in cfg.rewards}
        fns.update({n: f for n, f in extra.items() if n not in fns})
        return combine(fns, [float(cfg.rewards.get(n, 1.0)) for n in fns])

    def _build_problems(self) -> tuple[list, list[list[int]]]:
        cfg = self.cfg
        if cfg.data:
            problems = [p for path in cfg.data for p in load_problems(path)]
        else:
            problems = task_examples(cfg.tasks, "train", cfg.n_train_problems, cfg.difficulty, cfg.seed)
        prompts = [prompt_ids(p, self.tokenizer, cfg.template) for p in problems]
        limit = self.model.cfg.max_position_embeddings - cfg.max_new_tokens
        keep = [i for i, p in enumerate(prompts) if len(p) <= limit]
        if not keep:
            raise ValueError(f"every prompt is longer than max_position_embeddings "
                             f"({self.model.cfg.max_position_embeddings}) - max_new_tokens ({cfg.max_new_tokens}) "
                             f"= {limit} tokens; lower max_new_tokens")
        if len(keep) < len(problems):
            warnings.warn(f"dropped {len(problems) - len(keep)} of {len(problems)} problems whose prompt leaves no "
                          f"room for max_new_tokens={cfg.max_new_tokens}", stacklevel=3)
        return [problems[i] for i in keep], [prompts[i] for i in keep]

    def batch_indices(self, step: int, refill_round: int = 0, count: int | None = None) -> list[int]:
        """Problem indices of `step` (refill_round 0) or of one of its refill rounds: epochs of seeded
        permutations walked in order, one stream for the steps and one for the refills (pure in
        (seed, step, refill_round))."""
        n, P = len(self.problems), self.cfg.prompts_per_step
        count = P if count is None else count
        stream = 0 if refill_round == 0 else 1_000_003
        # a refill round's slot in its stream: wide enough for any count it can ask for
        pos = step * P if refill_round == 0 else (step * self.cfg.dynamic_sampling + refill_round - 1) * 4 * P
        out = []
        while len(out) < count:
            epoch, offset = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch + stream))
            take = perm[offset:offset + count - len(out)].tolist()
            out += take
            pos += len(take)
        return out

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One rollout (plus refill rounds under dynamic sampling) + `mu` updates; returns the metrics row
        (also appended to metrics.jsonl by fit), or None when a non-finite loss dropped its update."""
        return self.run.run_step(self._step)

    def _step(self) -> dict | None:
        cfg, G, P, step = self.cfg, self.cfg.group_size, self.cfg.prompts_per_step, self.run.step
        t0 = time.perf_counter()
        ro, scores, credit, mine = self._rollout_shared(self.batch_indices(step))
        signal = self._signal(scores, credit)
        refill = 0
        while cfg.filter_zero_variance and refill < cfg.dynamic_sampling:
            kept = int(signal.sum()) // G
            if kept >= P:
                break
            refill += 1
            # ask for the missing groups divided by the share kept so far (at least one in four)
            count = min(4 * P, math.ceil((P - kept) * len(ro) / max(kept * G, len(ro) / 4)))
            extra, extra_scores, extra_credit = self._rollout(self.batch_indices(step, refill, count),
                                                              first_index=len(ro) // G)
            ro, scores = ro + extra, scores + extra_scores
            credit = None if credit is None else credit + extra_credit
            signal = self._signal(scores, credit)
        t_gen = time.perf_counter() - t0

        rewards = torch.tensor(scores.total, dtype=torch.float32)
        adv = group_advantages(rewards, G, scale_std=cfg.scale_rewards != "none",
                               level="batch" if cfg.scale_rewards == "batch" else "group")
        rows = [i for i in range(len(ro)) if signal[i] or not cfg.filter_zero_variance]
        if refill:
            rows = rows[:P * G]  # the first prompts_per_step groups with a learning signal
        if cfg.positive_only:  # rows with a positive token advantage, adv + equation_credit x credit (_update)
            rows = [i for i in rows if adv[i] > 0 or credit is not None
                    and any(adv[i] + cfg.equation_credit * c > 0 for c in credit[i])]
        row = self._rollout_metrics(ro, scores, rewards, zero_variance_mask(rewards, G))
        row["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.lr_schedule)
        update = self._update(ro, adv, credit, rows, row["lr"], mine) if rows else {"loss": 0.0, "grad_norm": 0.0}
        if update is None:
            return None
        row.update(update)
        row.update(trained_completions=len(rows), rollout_prompts=len(ro) // G)
        t_all = time.perf_counter() - t0
        row.update(gen_time=t_gen, train_time=t_all - t_gen, step_time=t_all,
                   gen_tokens_per_s=ro.gen_tokens / max(t_gen, 1e-9), tokens_per_s=ro.gen_tokens / max(t_all, 1e-9))
        return row

    def _signal(self, scores: RewardScores, credit: list[list[float]] | None) -> torch.Tensor:
        """(R,) bool: the row's group has outcome variance or, with equation credit, some step credit."""
        G = self.cfg.group_size
        signal = ~zero_variance_mask(torch.tensor(scores.total, dtype=torch.float32), G)
        if credit is not None:
            signal |= torch.tensor([any(c) for c in credit]).view(-1, G).any(dim=1).repeat_interleave(G)
        return signal

    def _rollout_shared(self, idx: list[int]):
        """The step's rollout (plus its scores and credit) and the range of its rows this rank trains on. With
        several processes each samples its equal share of the prompts (seeded by their place in the step, as a
        single process would) and the rollouts are exchanged, so every rank computes the same advantages and
        metrics as one process would."""
        parallel = self.run.parallel
        if parallel is None:
            ro, scores, credit = self._rollout(idx, first_index=0)
            return ro, scores, credit, range(len(ro))
        share = len(idx) // parallel.dims.dp
        first = parallel.dp_rank * share
        local = self._rollout(idx[first:first + share], first_index=first)
        parts: list = [None] * parallel.dims.dp
        torch.distributed.all_gather_object(parts, local, group=parallel.dp_group)
        ro, scores, credit = parts[0]
        for more in parts[1:]:
            ro, scores = ro + more[0], scores + more[1]
            credit = None if credit is None else credit + more[2]
        G = self.cfg.group_size
        return ro, scores, credit, range(first * G, (first + share) * G)

    def _rollout(self, idx: list[int], first_index: int) -> tuple[Rollout, RewardScores, list[list[float]] | None]:
        """G samples for each problem in idx, their rewards, and their per-token equation credit (None when
        equation_credit is 0; it is normalised within groups, so rollouts of a step concatenate)."""
        cfg = self.cfg
        ro = sample_groups(self.llm, [self.prompts[i] for i in idx], [self.problems[i] for i in idx], cfg.group_size,
                           cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, self.run.step, first_index)
        scores = self.reward(ro.texts, ro.problems, completion_ids=ro.completion_ids,
                             completion_lengths=[len(c) for c in ro.completion_ids], tokenizer=self.tokenizer,
                             think_opened=self.think_opened)
        credit = None
        if cfg.equation_credit:
            credit = equation_credit(ro.completion_ids, self.tokenizer, cfg.group_size,
                                     [question_of(p) for p in ro.problems])
        return ro, scores, credit

    def _rollout_metrics(self, ro: Rollout, scores, rewards: torch.Tensor, zero: torch.Tensor) -> dict:
        G = self.cfg.group_size
        lengths = torch.tensor([len(c) for c in ro.completion_ids], dtype=torch.float32)
        acc = scores.per_reward.get("accuracy") or accuracy_reward(ro.texts, ro.problems,
                                                                   think_opened=self.think_opened)
        row = {"reward": rewards.mean().item(),
               "reward_std": rewards.view(-1, G).std(dim=1).mean().item(),  # TRL: mean within-group std
               "accuracy": sum(acc) / len(acc)}
        for name, vals in scores.per_reward.items():
            t = torch.tensor(vals)
            row[f"rewards/{name}/mean"], row[f"rewards/{name}/std"] = t.mean().item(), t.std().item()
        by_task: dict[str, list[float]] = {}
        for p, a in zip(ro.problems, acc):
            by_task.setdefault(task_of(p), []).append(a)
        if len(by_task) > 1:
            row.update({f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(by_task.items())})
        row.update(frac_reward_zero_std=zero.view(-1, G)[:, 0].float().mean().item(),
                   completion_len_mean=lengths.mean().item(), completion_len_max=lengths.max().item(),
                   completion_len_min=lengths.min().item(), truncated_share=sum(ro.truncated) / len(ro),
                   reflection_share=reflection_share(ro.texts), recheck_share=reflection_share(ro.texts, RECHECK_WORDS))
        return row

    def _update(self, ro: Rollout, adv: torch.Tensor, credit: list[list[float]] | None, rows: list[int],
                lr: float, mine: range) -> dict | None:
        """`mu` optimizer steps at `lr` on the completions `rows`, each accumulating over micro-batches (None when
        a loss was not finite). With `credit`, each token's advantage is adv[row] + equation_credit x credit[row][token].
        This rank trains on the rows in `mine` (all of them in a single process); the normalisers count every
        rank's rows, and the losses are scaled by the process count, since the gradient all-reduce averages."""
        cfg, model, dev, parallel = self.cfg, self.model, self.run.device, self.run.parallel
        n_rows, local = len(rows), [i for i in rows if i in mine]
        batches = []
        for s in range(0, len(local), cfg.micro_batch):
            mb = local[s:s + cfg.micro_batch]
            scoring = pad_batch([ro.prompt_ids[i] for i in mb], [ro.completion_ids[i] for i in mb], dev,
                                bucket_limit=self.bucket_limit)
            mask = scoring.mask
            if cfg.mask_truncated:  # DAPO overlong filtering
                mask = mask * torch.tensor([not ro.truncated[i] for i in mb], dtype=mask.dtype, device=dev)[:, None]
            a = adv[mb]
            if credit is not None:
                c = torch.zeros(mask.shape, dtype=a.dtype)
                for j, i in enumerate(mb):
                    c[j, :len(credit[i])] = torch.tensor(credit[i], dtype=a.dtype)
                a = a[:, None] + cfg.equation_credit * c
            if cfg.positive_only:
                a = a.clamp(min=0)
            b = {"scoring": scoring, "mask": mask, "adv": a.to(dev), "rows": len(mb)}
            with torch.no_grad(), self._autocast():
                if cfg.mu > 1:  # pi_old = the weights that sampled; needed once the first update has moved them
                    b["old"] = completion_logprobs(model, scoring, cfg.temperature)[0]
                if self.ref is not None:
                    b["ref"] = completion_logprobs(self.ref, scoring, cfg.temperature)[0]
            batches.append(b)
        n_tokens = float(sum(b["mask"].sum() for b in batches))
        scale = 1
        if parallel is not None:
            total = torch.tensor(n_tokens, dtype=torch.float64)
            torch.distributed.all_reduce(total, group=parallel.dp_group)
            n_tokens, scale = float(total), parallel.dims.dp
        n_tokens = max(1.0, n_tokens)
        sums: dict[str, float] = {}  # token-weighted statistics over every micro-batch of every pass

        def loss_fn(b: dict, first_pass: bool) -> tuple[torch.Tensor, dict[str, float]]:
            with self._autocast():
                logp, ent = completion_logprobs(model, b["scoring"], cfg.temperature, with_entropy=first_pass)
            old = b.get("old", logp.detach())
            loss, st = grpo_loss(logp, old, b.get("ref"), b["adv"], b["mask"], cfg.eps_low, cfg.eps_high,
                                 cfg.beta, cfg.loss_type, cfg.max_new_tokens,
                                 num_tokens=n_tokens if cfg.loss_type == "dapo" else None)
            if cfg.loss_type != "dapo":
                loss = loss * (b["rows"] / n_rows)  # per-micro-batch means -> the full batch's mean
            w = float(b["mask"].sum()) / n_tokens / cfg.mu  # token weights over all passes
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + w * v.item()
            if ent is not None:
                sums["entropy"] = sums.get("entropy", 0.0) + float((ent * b["mask"]).sum()) / n_tokens
            totals[-1] += loss.item()
            return (loss if scale == 1 else loss * scale), {}

        totals, grad_norm = [], 0.0
        model.eval()  # no dropout in the model; eval also keeps MoE from counting routed tokens
        for it in range(cfg.mu):
            totals.append(0.0)
            if self.run.accumulate(batches, lambda b: loss_fn(b, it == 0)) is None:
                return None
            grad_norm = self.run.optimizer_step(lr)
            sync_engine(self.llm)
        losses = totals
        if parallel is not None:  # every rank's share of the sums
            parts: list = [None] * parallel.dims.dp
            torch.distributed.all_gather_object(parts, (losses, sums), group=parallel.dp_group)
            losses = [sum(p[0][i] for p in parts) for i in range(cfg.mu)]
            sums = {k: sum(p[1].get(k, 0.0) for p in parts) for k in dict.fromkeys(k for p in parts for k in p[1])}
        return {"loss": sum(losses) / len(losses), "grad_norm": grad_norm,
                "clip_ratio": sums.pop("clip_frac"), "clip_ratio/low": sums.pop("clip_frac_low"),
                "clip_ratio/high": sums.pop("clip_frac_high"), **sums}

    def _autocast(self):
        return torch.autocast(self.run.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # ---- what the run's loop asks for, and the loop --------------------------------------------------
    def state_dict(self) -> dict:
        return {"grpo_config": self.cfg.to_dict(), "init": self.init}

    def postfix(self, row: dict) -> dict:
        return {"reward": f"{row['reward']:.3f}", "acc": f"{row['accuracy']:.2f}",
                "len": f"{row['completion_len_mean']:.0f}"}

    def save_model(self) -> str:
        """The policy + tokenizer to out/model, written beside it and renamed (never half-written)."""
        return save_model_dir(self.model, self.tokenizer, os.path.join(self.out, "model"))

    def fit(self) -> dict:
        """Train until cfg.steps; returns the last metrics row."""
        last = self.run.fit(self, self.cfg.steps, self.cfg.save_every)
        self.save_model()
        if is_main_process():
            write_grpo_plots(self.out)
        return last


def equation_credit(completion_ids: list[list[int]], tokenizer: Tokenizer, group_size: int,
                    questions: list[str] | None = None) -> list[list[float]]:
    """Per-token process credit from the equations each completion writes (see GRPOConfig.equation_credit).

    Each equation (rewards.equation_spans, grounded in questions[i] when given) is a step with reward 1 if it
    holds, else 0; grpo_loss.step_advantages normalises the step rewards over each group; every token that
    overlaps an equation's characters gets that equation's normalised reward. The text is rebuilt from the
    tokens one by one, so character offsets and tokens agree by construction. Returns one list per
    completion, as long as its token ids.
    """
    spans, steps = [], []
    for i, ids in enumerate(completion_ids):
        pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
        ends = list(itertools.accumulate(map(len, pieces)))
        eqs = equation_spans("".join(pieces), questions[i] if questions is not None else None)
        spans.append((eqs, ends))
        steps.append([float(holds) for _, _, holds in eqs])
    out = []
    for (eqs, ends), normed in zip(spans, step_advantages(steps, group_size)):
        credit = [0.0] * len(ends)
        for (start, end, _), value in zip(eqs, normed):
            # token t covers characters [ends[t-1], ends[t]); it overlaps [start, end) when ends[t] > start
            # and ends[t-1] < end
            for t in range(bisect.bisect_right(ends, start), min(bisect.bisect_left(ends, end) + 1, len(ends))):
                credit[t] += value
        out.append(credit)
    return out


def write_grpo_plots(out_dir: str) -> list[str]:
    """reward.png (total, per-reward means, accuracy) and length.png (completion length, truncation,
    reflection shares) from out_dir/metrics.jsonl; returns the paths written."""
    rows = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    if not rows:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    paths = []
    panels = {
        "reward.png": [("reward", ["reward"] + sorted(k for k in rows[-1] if k.startswith("rewards/") and
                                                    k.endswith("/mean"))),
                       ("accuracy", ["accuracy"] + sorted(k for k in rows[-1] if k.startswith("accuracy/")))],
        "length.png": [("completion tokens", ["completion_len_mean", "completion_len_max"]),
                       ("share of completions", ["truncated_share", "reflection_share", "recheck_share"])],
    }
    for name, axes_spec in panels.items():
        fig, axes = plt.subplots(1, len(axes_spec), figsize=(11, 4))
        for ax, (ylabel, keys) in zip(axes, axes_spec):
            for k in keys:
                ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=k, lw=1)
            ax.set(xlabel="step", ylabel=ylabel)
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
