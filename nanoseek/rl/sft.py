"""Supervised fine-tuning (`nanoseek sft`): the R1 cold start, SFT on rejection-sampled data, and the
trainer that distillation (nanoseek/rl/distill.py) builds on.

Data (nanoseek/rl/sft_data.py): one example per row, prompt targets ignored, so the loss covers the
completion and its EOS only. nanoseek's MLA has no document mask, so examples are never packed into
one row (a completion would attend to another example); `packing` groups examples of similar length
into micro-batches instead, padded to their longest row only.

Loss. The step's loss is the sum of token losses over all its micro-batches divided by the step's
completion tokens, so every completion token weighs the same whatever micro-batch it sits in (a mean
per micro-batch would over-weight short completions). Everything else follows the pretraining
trainer: AdamW (fused), warmup + cosine LR, global-norm clipping, skipped non-finite steps, atomic
checkpoints with optimizer/RNG/data position for bit-exact `resume`, metrics.jsonl and loss.png.
The routers' balancing biases stay frozen: fine-tuning data is too small and skewed to rebalance on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import from_pretrained
from ..config import ConfigError, load_config
from ..data.dataset import IGNORE_INDEX
from ..data.tokenizer import TOKENIZER_FILE, Tokenizer
from ..model import resolve_device
from ..train.metrics import MetricsLog, write_plots
from ..train.schedule import lr_at
from ..train.state import list_checkpoints, load_trainer_state, save_checkpoint, save_model_dir
from ..train.trainer import optimizer_step, skip_step
from .data import TEMPLATES, load_sft_rows
from .sft_data import SFTBatches, SFTExample, build_examples, collate_examples


@dataclass
class SFTConfig:
    """Fine-tuning settings (defaults: a couple of epochs over a cold-start set on a ~10M model, on CPU).

    Attributes:
        data: SFT files (.jsonl/.parquet rows of nanoseek.rl.data; concatenated in order).
        template: how "messages" rows become prompts: "chat" (the tokenizer's chat template) or "r1_zero".
        seq_len: longest training sequence in tokens (prompt + completion); longer ones are truncated.
        packing: group examples of similar length into micro-batches (examples are never packed into one
            row: the model has no document mask; see nanoseek/rl/sft_data.py).
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        epochs: passes over the data; ignored when max_steps is set.
        max_steps: optimizer steps (None: as many as `epochs` take).
        lr: peak AdamW LR. 1e-3 is a third of the pretraining peak of the ~10M presets (3e-3): high enough
            to learn a new format (chat tokens, <think>/<answer>) in two epochs, low enough to keep what
            pretraining taught. Billion-parameter models fine-tune near 1e-5; LR shrinks with width.
        min_lr_ratio: the cosine decays to min_lr_ratio * lr.
        warmup_ratio: linear warmup over this fraction of the steps (fine-tunes are short: a ratio, not a count).
        weight_decay: AdamW decoupled decay of matrices. 0: decay pulls weights towards zero, not towards
            the pretrained weights, so in a fine-tune it only erodes what pretraining learned.
        beta1, beta2: AdamW moments (as pretraining).
        grad_clip: global-norm clip (0 disables).
        mtp_lambda: weight of the MTP loss on completion tokens. 0: SFT changes what the main head says;
            the MTP modules only serve speculative decoding and cost a block forward/backward each per
            step. They are kept unchanged in the output (>0, e.g. 0.1, keeps drafts in step with the
            fine-tuned head, for better speculative acceptance).
        precision: "float32" or "bf16" (CPU autocast; weights and optimizer state stay fp32).
        log_every: steps between log lines.
        save_every: steps between checkpoints (0: only at the end).
        keep_checkpoints: complete checkpoints kept on disk.
        max_bad_steps: consecutive non-finite losses tolerated (each skips its step) before aborting.
        seed: data order (and a fresh distillation student's init).
        threads: torch CPU threads (0: torch's default).
        device: "cpu", "cuda", ... (None: cuda when available, else cpu).
        max_examples: use only the first N rows of `data` (None: all).
    """

    data: list[str] = field(default_factory=list)
    template: str = "chat"
    seq_len: int = 512
    packing: bool = True
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 2.0
    max_steps: int | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_lambda: float = 0.0
    precision: str = "float32"
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    seed: int = 0
    threads: int = 0
    device: str | None = None
    max_examples: int | None = None

    def __post_init__(self):
        name = type(self).__name__

        def req(ok, field_name, rule):
            if not ok:
                raise ConfigError(f"{name}.{field_name} {rule}")
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [os.fspath(self.data)]
        req(isinstance(self.data, list) and all(isinstance(p, str) for p in self.data), "data",
            "must be a list of file paths")
        req(self.template in TEMPLATES, "template", f"must be one of {TEMPLATES}")
        for f in ("seq_len", "batch_size", "grad_accum", "log_every", "keep_checkpoints", "max_bad_steps"):
            req(_is_int(getattr(self, f)) and getattr(self, f) > 0, f, "must be a positive int")
        for f in ("save_every", "threads", "seed"):
            req(_is_int(getattr(self, f)) and getattr(self, f) >= 0, f, "must be an int >= 0")
        for f in ("max_steps", "max_examples"):
            req(getattr(self, f) is None or (_is_int(getattr(self, f)) and getattr(self, f) > 0), f,
                "must be a positive int or None")
        req(isinstance(self.epochs, (int, float)) and self.epochs > 0, "epochs", "must be > 0")
        req(self.lr > 0, "lr", "must be > 0")
        req(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        req(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        req(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", "must be in [0, 1)")
        for f in ("weight_decay", "grad_clip", "mtp_lambda"):
            req(getattr(self, f) >= 0, f, "must be >= 0")
        req(self.precision in ("float32", "bf16"), "precision", "must be float32 or bf16")
        req(isinstance(self.packing, bool), "packing", "must be true or false")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides):
        """Defaults <- JSON/TOML file <- overrides (None values are ignored), like TrainConfig.load."""
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- data and model folders ------------------------------------------------------------------

def load_examples(cfg: SFTConfig, tokenizer: Tokenizer) -> list[SFTExample]:
    """Rows of every file in cfg.data (validated by load_sft_rows), cut to max_examples, tokenized."""
    if not cfg.data:
        raise ValueError("no SFT data: give one or more .jsonl/.parquet files (--data)")
    rows = [row for path in cfg.data for row in load_sft_rows(path)]
    return build_examples(rows[:cfg.max_examples], tokenizer, cfg.seq_len, cfg.template)


def load_init(path: str) -> tuple[torch.nn.Module, Tokenizer]:
    """An HF-format folder's model (fp32, for training) and tokenizer; clear errors when either is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        raise FileNotFoundError(f"{path} has no {TOKENIZER_FILE}: save the model's tokenizer next to it")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not an HF-format checkpoint folder")
    return from_pretrained(path, dtype=torch.float32), Tokenizer.load(path)


# ---- the trainer ----------------------------------------------------------------------------------

class SFTTrainer:
    """Fine-tune the model in `init` on cfg.data; outputs go to `out`.

    Args:
        cfg: the settings.
        init: HF-format checkpoint folder with tokenizer files (e.g. written by `nanoseek train`).
        out: output folder: metrics.jsonl, loss.png, checkpoints/ (resumable), model/ (the final
            model + tokenizer, loadable by nanoseek.from_pretrained and nanoseek.LLM).
        resume: continue from the newest complete checkpoint in out/checkpoints (bit-exact).
        progress: show a tqdm bar.

    Subclasses change the objective through `loss_parts` and `loss_weights` (see Distiller).
    """

    name = "sft"  # progress-bar label

    def __init__(self, cfg: SFTConfig, init: str, out: str, resume: bool = False, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, out, progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.ckpt_dir = os.path.join(out, "checkpoints")
        latest = list_checkpoints(self.ckpt_dir)[-1] if resume and list_checkpoints(self.ckpt_dir) else None
        if resume and latest is None:
            warnings.warn(f"--resume: no complete checkpoint in {self.ckpt_dir}; starting from {init}", stacklevel=2)
        self.device = resolve_device(cfg.device)
        self.model, self.tokenizer = load_init(latest or init)
        self.model.to(self.device)
        if self.tokenizer.vocab_size > self.model.cfg.vocab_size:
            raise ValueError(f"the tokenizer in {init} has {self.tokenizer.vocab_size} ids but the model only "
                             f"{self.model.cfg.vocab_size}: they do not belong together")
        if cfg.seq_len > self.model.cfg.max_position_embeddings:
            raise ConfigError(f"{type(cfg).__name__}.seq_len {cfg.seq_len} exceeds the model's "
                              f"max_position_embeddings {self.model.cfg.max_position_embeddings}")
        self.examples = load_examples(cfg, self.tokenizer)
        self.batches = SFTBatches([len(ex.tokens) for ex in self.examples], cfg.batch_size, cfg.seed, cfg.packing)
        self.max_steps = cfg.max_steps or math.ceil(cfg.epochs * self.batches.per_epoch / cfg.grad_accum)
        self.warmup = round(cfg.warmup_ratio * self.max_steps)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
        self.step, self.bad_steps, self.tokens_seen = 0, 0, 0
        if latest is not None:
            state = load_trainer_state(latest, self.optimizer)
            self.step, self.bad_steps = state["step"], state.get("bad_steps", 0)
            self.tokens_seen = state.get("tokens_seen", 0)
            self.batches.load_state_dict(state["data"])
        os.makedirs(out, exist_ok=True)
        self.metrics = MetricsLog(out, resume_step=self.step if latest is not None else None)

    # ---- the objective --------------------------------------------------------------------------
    def loss_weights(self) -> dict[str, float]:
        """Weight of each loss part in the step's loss."""
        return {"lm_loss": 1.0, "mtp_loss": self.cfg.mtp_lambda}

    def loss_parts(self, input_ids: torch.Tensor, labels: torch.Tensor, n_tokens: int) -> tuple[dict, torch.Tensor]:
        """This micro-batch's share of each loss part (token sums / the step's completion tokens `n_tokens`)
        and the main head's logits [B, T, V] (fp32)."""
        model = self.model
        h = model.hidden_states(input_ids)
        logits = model.lm_head(h).float()
        parts = {"lm_loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n_tokens}
        if self.cfg.mtp_lambda > 0 and len(model.mtp):
            # depth k predicts labels[:, i + k]; the mean over depths is the V3 report's (1/D) sum_k (eq. 25)
            depths = [F.cross_entropy(model.lm_head(h_k).flatten(0, 1).float(), labels[:, k:].flatten(),
                                      reduction="sum") / n_tokens
                      for k, h_k in enumerate(model.mtp_hidden_states(h, input_ids), start=1)]
            parts["mtp_loss"] = torch.stack(depths).mean()
        return parts, logits

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        lr = lr_at(self.step, self.max_steps, cfg.lr, self.warmup, "cosine", cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        micro = [tuple(t.to(self.device) for t in collate_examples([self.examples[i] for i in next(self.batches)],
                                                                   self.tokenizer.pad_id))
                 for _ in range(cfg.grad_accum)]
        n_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in micro)
        weights = self.loss_weights()
        totals: dict[str, float] = {"loss": 0.0}
        finite = True
        for input_ids, labels in micro:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                parts, _ = self.loss_parts(input_ids, labels, n_tokens)
                loss = sum(weights[k] * v for k, v in parts.items())
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            totals["loss"] += loss.item()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v.item()
        if not finite:
            return skip_step(self, lr)
        self.bad_steps = 0
        grad_norm = optimizer_step(model, self.optimizer, cfg.grad_clip)
        seen = sum(int((ids != self.tokenizer.pad_id).sum()) for ids, _ in micro)  # real tokens, padding excluded
        self.tokens_seen += seen
        self.step += 1
        return {"step": self.step, "epoch": round(self.batches.progress, 4), **totals, "lr": lr,
                "grad_norm": grad_norm, "completion_tokens": n_tokens, "tokens": self.tokens_seen,
                "tokens_per_s": seen / (time.perf_counter() - t0)}

    def save(self) -> str:
        return save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                               {"data": self.batches.state_dict(), "bad_steps": self.bad_steps,
                                "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict()},
                               tokenizer=self.tokenizer, keep=self.cfg.keep_checkpoints)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to max_steps, checkpointing on the way; write out/model/; return the last metrics row."""
        cfg, last = self.cfg, {}
        bar = tqdm(total=self.max_steps, initial=self.step, desc=self.name, disable=not self.progress,
                   dynamic_ncols=True)
        try:
            while self.step < self.max_steps:
                row = self.train_step()
                bar.update(1)
                if row.get("skipped"):
                    continue
                self.metrics.log(row)
                last = row
                at_end = self.step == self.max_steps
                if self.step % cfg.log_every == 0 or at_end:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}")
                    tqdm.write(_log_line(row))
                if (cfg.save_every and self.step % cfg.save_every == 0) or at_end:
                    self.save()
        finally:
            bar.close()
            self.metrics.close()
        save_model_dir(self.model, self.tokenizer, os.path.join(self.out, "model"))
        write_plots(self.out)
        return last


def _log_line(row: dict) -> str:
    parts = [f"step {row['step']:>6}", f"epoch {row['epoch']:.2f}", f"loss {row['loss']:.4f}"]
    parts += [f"{k.removesuffix('_loss')} {row[k]:.4f}" for k in ("lm_loss", "mtp_loss", "kd_loss") if k in row]
    parts += [f"lr {row['lr']:.2e}", f"gnorm {row['grad_norm']:.2f}", f"{row['tokens_per_s']:.0f} tok/s"]
    return " | ".join(parts)


def sft(cfg: SFTConfig, init: str, out: str, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune `init` on cfg.data into `out` (see SFTTrainer); returns the last metrics row."""
    return SFTTrainer(cfg, init, out, resume=resume, progress=progress).fit()
