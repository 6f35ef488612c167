"""`nanoseek r1`: the whole DeepSeek-R1 recipe at miniature scale, stage by stage, with a report.

Stages (R1 v2 §3 / Fig. 2, v1 §2.4; docs/design/grpo_sources.md), each in its own folder of the run:
  pretrain          tokenizer + MoE/MLA/MTP base model on R1-format task documents (train split) and
                    drill sheets of their single operations
  cold_start        SFT of the base on a small set of long worked solutions in the chat template
  grpo              reasoning-oriented GRPO from the cold-start model (accuracy + format rewards)
  sample            rejection sampling from the GRPO model: correct, well-formed, non-repetitive, dedup'd
  rs_sft            SFT of the *base* on cold-start + rejection-sampled data (R1 fine-tunes V3-Base)
  rl2               second RL stage from rs_sft, rollout temperature 0.7 (R1 v2 §3.2.2)
  student_pretrain  a smaller dense student pretrained on the same corpus
  distill           the student fine-tuned on the rejection-sampled traces (sequence-level KD, as R1)
  student_grpo      the same student base trained with GRPO alone (R1-Zero style, R1 template): the
                    baseline R1 §4.1 compares distillation with

Every stage ends by evaluating its model on held-out problems (test split) with the R1 protocol
(nanoseek.rl.evaluate: pass@1 over k samples at T 0.6 and maj@k); base models are evaluated with the
R1-Zero template they were pretrained on, fine-tuned ones with the chat template they were trained on.

Resumable per stage: a finished stage leaves `stage.json` (its model folder, evaluation, timing) and is
skipped on the next run; an interrupted stage resumes from its own newest checkpoint. `report.json`
(a list of stages with their held-out accuracy per task) and `report.md` (tables, curves, samples,
time per stage) are rewritten after every stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import ConfigError, read_config_file
from ..data.corpus import drill_documents
from ..data.r1_format import r1_document
from ..data.tokenizer import Tokenizer
from ..machine import COMPILE_CHOICES, PRECISIONS
from .data import cold_start_rows, read_rows, task_examples, write_rows
from .evaluate import EvalConfig, evaluate
from .report import write_json, write_report

STAGES = ("pretrain", "cold_start", "grpo", "sample", "rs_sft", "rl2", "student_pretrain", "distill",
          "student_grpo")
# the dense student: same width as `small`, 2 layers, a SwiGLU FFN instead of MoE (no MTP: it is never decoded speculatively)
STUDENT_MODEL = {"num_hidden_layers": 2, "n_routed_experts": 0, "intermediate_size": 512, "num_nextn_predict_layers": 0}


@dataclass
class R1Config:
    """The R1 pipeline. Every stage field holds overrides of that stage's own config class.

    Attributes:
        tasks: built-in tasks used everywhere (pretraining corpus, SFT, RL, evaluation).
        difficulty: task level for every stage (None mixes all levels). Level 1 holds only about 1,000
            linear and 2,400 countdown training problems, so a large `scale` needs None.
        seed: seeds every stage.
        scale: multiplies every stage's steps, data sizes and evaluation size (1 = the CPU default run,
            25-56 minutes on 2 cores depending on the CPU, 7 on one H100; GPUs: e.g. --scale 10 with a bigger
            --preset).
        preset: model preset of the teacher (the student takes it with STUDENT_MODEL overrides).
        pretrain_docs: task documents per task in the pretraining corpus.
        pretrain_drills: drill sheets in the pretraining corpus, each 40 single operations taken from the
            corpus's worked solutions (nanoseek.data.corpus.drill_documents); 0 leaves them out.
        pretrain: TrainConfig overrides for the base model.
        student_pretrain: TrainConfig overrides for the student base (its `model` field makes it dense).
        cold_start_examples: worked solutions per task in the cold-start set ("thousands" in R1).
        cold_start, rs_sft: SFTConfig overrides.
        grpo, rl2, student_grpo: GRPOConfig overrides.
        sample_problems: train problems per task for rejection sampling.
        sample: SampleConfig overrides.
        distill: DistillConfig overrides.
        eval_problems: held-out problems per task.
        eval: EvalConfig overrides (k, temperature, top_p, max_new_tokens).
        threads: torch CPU threads (0: torch's default).
        precision: precision of the pretraining, SFT and distillation stages ("float32", "bf16", "fp8" or "auto":
            bf16 where this machine's bf16 GEMMs are faster; nanoseek/machine.py); a stage's own `precision` wins.
            The RL stages' updates take it too (bf16 for "fp8": they have no FP8 path); their rollouts decode in
            fp32.
        compile_rollouts: the RL stages' rollouts through torch.compile: True, False or "auto" (the CLI's
            default: where a probe finds that it pays, per stage; GRPOConfig.compile_rollouts); a stage's own wins.
    """

    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "countdown", "linear"])
    difficulty: int | None = 1
    seed: int = 0
    scale: float = 1.0
    preset: str = "small"
    pretrain_docs: int = 1000
    pretrain_drills: int = 400
    # 512-token rows (not 256): a document (170-350 tokens) split across rows loses its question, and those
    # fragments teach the model to write numbers it cannot have read (docs/r1_report.md)
    pretrain: dict = field(default_factory=lambda: {"max_steps": 1400, "seq_len": 512, "batch_size": 4,
                                                    "save_every": 350, "val_every": 350, "warmup_steps": 30})
    student_pretrain: dict = field(default_factory=lambda: {"max_steps": 1000, "seq_len": 512, "batch_size": 4,
                                                            "save_every": 500, "val_every": 500,
                                                            "warmup_steps": 30, "balance": "none",
                                                            "mtp_lambda": 0.0, "mtp_lambda_late": 0.0,
                                                            "model": STUDENT_MODEL})
    cold_start_examples: int = 600
    cold_start: dict = field(default_factory=lambda: {"epochs": 3, "lr": 1e-3})
    # 32 prompts per step: with 8, each Adam step follows mostly noise and held-out pass@1 falls below the
    # cold start's (3 seeds: 0.398 vs 0.456 mean; 32 x 80 steps: 0.459, and 0.576 vs 0.531 from a cold start
    # whose written facts are more often right; docs/r1_report.md)
    grpo: dict = field(default_factory=lambda: {"steps": 80, "prompts_per_step": 32, "group_size": 8, "lr": 1e-4,
                                                "max_new_tokens": 256, "save_every": 40})
    sample_problems: int = 150
    sample: dict = field(default_factory=lambda: {"k": 4, "max_new_tokens": 256, "temperature": 1.0})
    rs_sft: dict = field(default_factory=lambda: {"epochs": 3, "lr": 1e-3})
    # 80 steps like the first RL stage: after 30, held-out pass@1 was still below rs_sft's (0.510 vs 0.530 on
    # 100 problems per task), after 80 it was 0.587 over three seeds (docs/r1_report.md)
    rl2: dict = field(default_factory=lambda: {"steps": 80, "prompts_per_step": 32, "group_size": 8, "lr": 1e-4,
                                               "max_new_tokens": 256, "temperature": 0.7, "save_every": 40})
    distill: dict = field(default_factory=lambda: {"epochs": 3, "lr": 1e-3})
    student_grpo: dict = field(default_factory=lambda: {"steps": 40, "prompts_per_step": 8, "group_size": 8,
                                                        "lr": 1e-4, "max_new_tokens": 256, "template": "r1_zero",
                                                        "save_every": 20})
    eval_problems: int = 50
    eval: dict = field(default_factory=lambda: {"k": 4, "max_new_tokens": 256})
    threads: int = 0
    precision: str = "float32"
    compile_rollouts: bool | str = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"R1Config.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile_rollouts not in COMPILE_CHOICES.values():
            raise ConfigError(f"R1Config.compile_rollouts must be true, false or \"auto\", "
                              f"got {self.compile_rollouts!r}")
        if not self.tasks:
            raise ConfigError("R1Config.tasks must name at least one task")
        if not self.scale > 0:
            raise ConfigError(f"R1Config.scale must be > 0, got {self.scale}")
        if self.pretrain_drills < 0:
            raise ConfigError(f"R1Config.pretrain_drills must be >= 0, got {self.pretrain_drills}")
        for name in ("pretrain_docs", "cold_start_examples", "sample_problems", "eval_problems"):
            if getattr(self, name) < 1:
                raise ConfigError(f"R1Config.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def load(cls, path: str | None = None, defaults: dict | None = None, **overrides) -> "R1Config":
        """Defaults <- `defaults` <- JSON/TOML file (stage dicts are merged into the defaults) <- overrides (None
        ignored)."""
        values = read_config_file(cls, path) if path is not None else {}
        base = cls()
        for key, value in values.items():
            if isinstance(getattr(base, key), dict) and isinstance(value, dict):
                values[key] = {**getattr(base, key), **value}
        values = {**(defaults or {}), **values}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def n(self, count: int) -> int:
        """A size scaled by `scale` (at least 1)."""
        return max(1, round(count * self.scale))


class R1Pipeline:
    """Runs the stages into `out`; `run(stages)` returns the report dict."""

    def __init__(self, cfg: R1Config, out: str, progress: bool = True, log: Callable[[str], None] = print):
        self.cfg, self.out, self.progress, self.log = cfg, out, progress, log
        os.makedirs(out, exist_ok=True)
        if cfg.threads:
            import torch
            torch.set_num_threads(cfg.threads)
        self.held_out = task_examples(cfg.tasks, "test", cfg.n(cfg.eval_problems), cfg.difficulty, seed=cfg.seed)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _dir(self, stage: str) -> str:
        return os.path.join(self.out, stage)

    def _record(self, stage: str) -> dict | None:
        path = os.path.join(self._dir(stage), "stage.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _started(self, stage: str) -> bool:
        """Whether an interrupted earlier run of `stage` left a checkpoint to resume from."""
        from ..train.state import list_checkpoints
        return bool(list_checkpoints(os.path.join(self._dir(stage), "checkpoints")))

    def model_of(self, stage: str) -> str | None:
        """The model folder `stage` finished with (None for a stage without one), inside this run folder.

        Records store it relative to the run folder, so a moved or copied run resumes from its own models.
        Older records stored the path as given at the time ("runs/r1/grpo/model"); it is re-anchored at its
        stage folder here, never followed outside the run, where another run's model may sit.
        """
        record = self._record(stage)
        if record is None:
            raise ValueError(f"stage {stage!r} has not finished in {self.out}; run it first")
        stored = record["model"]
        if stored is None:
            return None
        parts = os.path.normpath(stored).split(os.sep)
        if stage in parts:  # from the stage folder on (the last match: the run folder may share its name)
            parts = parts[len(parts) - 1 - parts[::-1].index(stage):]
        path = os.path.join(self.out, *parts)
        if not os.path.isdir(path):
            raise ValueError(f"stage {stage!r} finished with model {stored!r}, which is not in {self.out} (moved or "
                             f"deleted?); remove {os.path.join(self._dir(stage), 'stage.json')} to run it again")
        return path

    def run(self, stages: list[str] | None = None) -> dict:
        wanted = list(stages or STAGES)
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
        write_json(os.path.join(self.out, "r1_config.json"), dataclasses.asdict(self.cfg))
        for stage in STAGES:
            if stage not in wanted:
                continue
            if self._record(stage) is not None:
                self.log(f"[r1] {stage}: done earlier, skipped")
                continue
            self.log(f"[r1] {stage}: starting")
            t0 = time.perf_counter()
            model_dir, template, extra = getattr(self, f"_stage_{stage}")()
            train_s = time.perf_counter() - t0
            result = self._evaluate(model_dir, template) if model_dir else None
            record = {"name": stage, "model": model_dir and os.path.relpath(model_dir, self.out),
                      "template": template, "seconds": time.perf_counter() - t0, "train_seconds": train_s,
                      **(result or {}), **extra}
            write_json(os.path.join(self._dir(stage), "stage.json"), record)
            if result:
                self.log(f"[r1] {stage}: " + ", ".join(f"{t} pass@1 {m['pass@1']:.3f} maj@{result['k']} {m['maj@k']:.3f}"
                                                       for t, m in result["tasks"].items())
                         + f" ({record['seconds']:.0f} s)")
            write_report(self.out, [r for s in STAGES if (r := self._record(s))])
        return write_report(self.out, [r for s in STAGES if (r := self._record(s))])

    def _evaluate(self, model_dir: str, template: str) -> dict:
        cfg = EvalConfig(**{"seed": self.cfg.seed, **self.cfg.eval, "template": template})
        return evaluate(model_dir, Tokenizer.load(model_dir), self.held_out, cfg)

    # ---- stages: each returns (model folder or None, prompt template, extra record fields) ----------
    def _corpus(self) -> str:
        path = os.path.join(self.out, "pretrain_corpus.jsonl")
        if not os.path.isfile(path):
            examples = task_examples(self.cfg.tasks, "train", self.cfg.n(self.cfg.pretrain_docs), self.cfg.difficulty,
                                     seed=self.cfg.seed)
            docs = [r1_document(ex) for ex in examples]
            if self.cfg.pretrain_drills:
                docs += drill_documents(examples, self.cfg.n(self.cfg.pretrain_drills), seed=self.cfg.seed)
            random.Random(self.cfg.seed).shuffle(docs)
            write_rows(path, [{"text": d} for d in docs])
        return path

    def _pretrain(self, stage: str, overrides: dict, tokenizer: str | None) -> tuple[str, str, dict]:
        from ..train import TrainConfig, Trainer
        from ..train.state import list_checkpoints

        values = {"preset": self.cfg.preset, "seed": self.cfg.seed, "precision": self.cfg.precision,
                  "data": [self._corpus()], **overrides}
        values["max_steps"] = self.cfg.n(values.get("max_steps", 200))
        if tokenizer:
            values["tokenizer"] = tokenizer
        trainer = Trainer(TrainConfig(**values), self._dir(stage), resume=self._started(stage), progress=self.progress)
        last = trainer.fit()
        model = list_checkpoints(trainer.run.ckpt_dir)[-1]
        return model, "r1_zero", {"val_loss": last.get("val_loss"), "parameters": trainer.model.num_parameters()}

    def _stage_pretrain(self):
        return self._pretrain("pretrain", self.cfg.pretrain, tokenizer=None)

    def _stage_student_pretrain(self):
        # the student shares the teacher's tokenizer, so token-level KD and its traces line up
        return self._pretrain("student_pretrain", self.cfg.student_pretrain, tokenizer=self.model_of("pretrain"))

    def _sft(self, stage: str, init: str, data: list[str], overrides: dict) -> tuple[str, str, dict]:
        from .sft import SFTConfig, SFTTrainer

        values = {"seed": self.cfg.seed, "precision": self.cfg.precision, **overrides, "data": data}
        if values.get("max_steps"):
            values["max_steps"] = self.cfg.n(values["max_steps"])
        trainer = SFTTrainer(SFTConfig(**values), init, self._dir(stage), resume=self._started(stage), progress=self.progress)
        last = trainer.fit()
        return os.path.join(self._dir(stage), "model"), "chat", {"final_loss": last.get("loss"),
                                                                 "examples": len(trainer.examples)}

    def _cold_start_data(self) -> str:
        path = os.path.join(self.out, "cold_start.jsonl")
        if not os.path.isfile(path):
            # seed + 1: different problems from the corpus's first ones (the train split is the same)
            examples = task_examples(self.cfg.tasks, "train", self.cfg.n(self.cfg.cold_start_examples),
                                     self.cfg.difficulty, seed=self.cfg.seed + 1)
            write_rows(path, cold_start_rows(examples))
        return path

    def _stage_cold_start(self):
        return self._sft("cold_start", self.model_of("pretrain"), [self._cold_start_data()], self.cfg.cold_start)

    def _grpo(self, stage: str, init: str, overrides: dict) -> tuple[str, str, dict]:
        from .grpo import GRPOConfig, GRPOTrainer

        values = {"tasks": self.cfg.tasks, "difficulty": self.cfg.difficulty, "seed": self.cfg.seed,
                  "precision": {"fp8": "bf16"}.get(self.cfg.precision, self.cfg.precision),
                  "compile_rollouts": self.cfg.compile_rollouts, **overrides}
        values["steps"] = self.cfg.n(values.get("steps", 40))
        cfg = GRPOConfig(**values)
        trainer = GRPOTrainer(cfg, init, self._dir(stage), resume=self._started(stage), progress=self.progress)
        trainer.fit()
        return os.path.join(self._dir(stage), "model"), cfg.template, {}

    def _stage_grpo(self):
        return self._grpo("grpo", self.model_of("cold_start"), self.cfg.grpo)

    def _stage_sample(self):
        from .sample import SampleConfig, rejection_sample

        model = self.model_of("grpo")
        # seed + 2: problems other than the cold-start set's
        problems = task_examples(self.cfg.tasks, "train", self.cfg.n(self.cfg.sample_problems), self.cfg.difficulty,
                                 seed=self.cfg.seed + 2)
        cfg = SampleConfig(**{"seed": self.cfg.seed, **self.cfg.sample, "template": "chat"})
        rows, stats = rejection_sample(model, Tokenizer.load(model), problems, cfg)
        write_rows(os.path.join(self._dir("sample"), "rejection_sampled.jsonl"), rows)
        return None, "chat", {"sampling": stats}

    def _distill_data(self) -> list[str]:
        """Cold-start + rejection-sampled rows (the latter only when sampling kept any)."""
        self.model_of("sample")
        rs = os.path.join(self._dir("sample"), "rejection_sampled.jsonl")
        return [self._cold_start_data()] + ([rs] if read_rows(rs) else [])

    def _stage_rs_sft(self):
        return self._sft("rs_sft", self.model_of("pretrain"), self._distill_data(), self.cfg.rs_sft)

    def _stage_rl2(self):
        return self._grpo("rl2", self.model_of("rs_sft"), self.cfg.rl2)

    def _stage_distill(self):
        from .distill import DistillConfig, distill

        values = {"seed": self.cfg.seed, "precision": self.cfg.precision, **self.cfg.distill,
                  "data": self._distill_data(), "student_init": self.model_of("student_pretrain")}
        last = distill(DistillConfig(**values), self._dir("distill"), resume=self._started("distill"), progress=self.progress)
        return os.path.join(self._dir("distill"), "model"), "chat", {"final_loss": last.get("loss")}

    def _stage_student_grpo(self):
        return self._grpo("student_grpo", self.model_of("student_pretrain"), self.cfg.student_grpo)

