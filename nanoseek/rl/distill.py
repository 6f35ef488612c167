"""Distillation (`nanoseek distill`): a smaller dense student learns from a teacher's reasoning traces.

R1's distillation (R1 paper §2.4) is sequence-level: the student is fine-tuned on the teacher's
rejection-sampled traces (nanoseek/rl/sample.py writes them as SFT rows), nothing more. That is
`kd_alpha = 0`, the default, and it is exactly SFT (SFTTrainer) of a student model. `kd_alpha > 0`
adds the token-level objective of Hinton et al.: on completion tokens, KL(teacher || student) of the
distributions softened by `kd_temperature`, scaled by T^2 so its gradients keep their size as T
changes; the step's loss is (1 - kd_alpha) * CE + kd_alpha * T^2 * KL. It needs the teacher's
logits on every training sequence, so the teacher is loaded (frozen, fp32) only then, and the two
models must share the tokenizer and vocabulary size.

The student is either an existing checkpoint (`student_init`, e.g. a dense model pretrained with
`nanoseek train`) or a fresh one built from `student_preset` + `student` overrides with the
teacher's tokenizer and vocabulary size. The default is the `small` preset made dense and narrower
(no routed experts, no MTP, hidden 192, FFN 512): about a third of the `small` MoE teacher's
parameters (two thirds of its activated ones) at the same depth, since depth matters more than
width for multi-step arithmetic. A fresh student is written to out/student_init/ first, so the
trainer starts, as for SFT, from an HF folder, and the run's init can be inspected afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import PRESETS, ModelConfig, Validator
from ..data.dataset import IGNORE_INDEX
from ..data.tokenizer import Tokenizer
from ..model import build_model
from ..train.state import save_model_dir
from .sft import SFTConfig, SFTTrainer, load_init

DEFAULT_STUDENT = {"n_routed_experts": 0, "num_nextn_predict_layers": 0, "hidden_size": 192, "intermediate_size": 512}


@dataclass
class DistillConfig(SFTConfig):
    """SFTConfig plus the student and the token-level KD settings.

    Attributes:
        student_preset: preset of a fresh student (nanoseek.config.PRESETS).
        student: ModelConfig overrides of that preset (vocab_size and the special-token ids follow the
            teacher/tokenizer). Default: dense, no MTP, narrower (see the module docstring).
        student_init: an existing student checkpoint folder (with tokenizer) to start from instead.
        teacher: the teacher's checkpoint folder: its tokenizer for a fresh student, its logits for KD.
        kd_alpha: weight of the token-level KD loss; 0 = sequence-level distillation only (R1's method).
        kd_temperature: softmax temperature T of both distributions in the KD loss.
    """

    student_preset: str = "small"
    student: dict = field(default_factory=lambda: dict(DEFAULT_STUDENT))
    student_init: str | None = None
    teacher: str | None = None
    kd_alpha: float = 0.0
    kd_temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        v = Validator(self)
        v.one_of("student_preset", sorted(PRESETS))
        v.require(isinstance(self.student, dict), "student", "must be a mapping of ModelConfig fields")
        v.number("kd_alpha", 0, 1)
        v.number("kd_temperature", 0, open_low=True)
        v.require(self.kd_alpha == 0 or self.teacher is not None, "teacher", "is needed when kd_alpha > 0")
        v.require(self.teacher is not None or self.student_init is not None, "teacher",
                  "or student_init is needed (a fresh student takes the teacher's tokenizer)")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Sum over labelled positions of KL(softmax(t/T) || softmax(s/T)); logits [B, T, V], labels [B, T]."""
    keep = labels != IGNORE_INDEX
    s = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


def build_student(cfg: DistillConfig, tokenizer: Tokenizer, vocab_size: int) -> torch.nn.Module:
    """A fresh student (seeded by cfg.seed) for `tokenizer`, with `vocab_size` head rows."""
    overrides = {**cfg.student, "vocab_size": vocab_size, "bos_token_id": tokenizer.bos_id,
                 "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return build_model(ModelConfig.preset(cfg.student_preset, **overrides), seed=cfg.seed)


class Distiller(SFTTrainer):
    """SFTTrainer on a student, with the KD term when cfg.kd_alpha > 0; the final student goes to out/model/.

    Args:
        cfg: the settings.
        out: output folder (as SFTTrainer; plus student_init/ for a fresh student).
        resume, progress: as SFTTrainer.
    """

    name = "distill"

    def __init__(self, cfg: DistillConfig, out: str, resume: bool = False, progress: bool = True):
        self.teacher, teacher_tok = None, None
        if cfg.kd_alpha > 0:
            self.teacher, teacher_tok = load_init(cfg.teacher)
            self.teacher.eval().requires_grad_(False)
        init = cfg.student_init
        if init is None:  # a fresh student: the teacher's tokenizer and vocabulary size
            if teacher_tok is None:
                teacher_tok = Tokenizer.load(cfg.teacher)
            vocab = ModelConfig.from_hf(cfg.teacher).vocab_size
            init = save_model_dir(build_student(cfg, teacher_tok, vocab), teacher_tok,
                                  os.path.join(out, "student_init"))
        super().__init__(cfg, init, out, resume=resume, progress=progress)
        if self.teacher is not None:
            self.teacher.to(self.run.device)
            if self.teacher.cfg.vocab_size != self.model.cfg.vocab_size:
                raise ValueError(f"KD needs one vocabulary: the teacher has {self.teacher.cfg.vocab_size} logits, "
                                 f"the student {self.model.cfg.vocab_size}")
            if teacher_tok.backend.get_vocab() != self.tokenizer.backend.get_vocab():
                raise ValueError(f"KD needs one tokenizer: {cfg.teacher} and the student tokenize differently")

    def loss_weights(self) -> dict[str, float]:
        a, T = self.cfg.kd_alpha, self.cfg.kd_temperature
        if self.teacher is None:
            return super().loss_weights()
        return {**super().loss_weights(), "lm_loss": 1 - a, "kd_loss": a * T * T}

    def part_names(self) -> list[str]:
        return super().part_names() + (["kd_loss"] if self.teacher is not None else [])

    def loss_parts(self, input_ids, labels, n_tokens):
        parts, logits = super().loss_parts(input_ids, labels, n_tokens)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids)
            parts["kd_loss"] = kd_loss(logits, teacher_logits, labels, self.cfg.kd_temperature) / n_tokens
        return parts, logits


def distill(cfg: DistillConfig, out: str, resume: bool = False, progress: bool = True) -> dict:
    """Train the student of `cfg` into `out` (see Distiller); returns the last metrics row."""
    return Distiller(cfg, out, resume=resume, progress=progress).fit()
