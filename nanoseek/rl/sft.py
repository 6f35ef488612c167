"""Supervised fine-tuning (`nanoseek sft`): the R1 cold start, SFT on rejection-sampled data, and the
trainer that distillation (nanoseek/rl/distill.py) builds on.

Data (nanoseek/rl/sft_data.py): one example per row, prompt targets ignored, so the loss covers the
completion and its EOS only. nanoseek's MLA has no document mask, so examples are never packed into
one row (a completion would attend to another example); `packing` groups examples of similar length
into micro-batches instead, padded to their longest row only.

Loss. The step's loss is the sum of token losses over all its micro-batches divided by the step's
completion tokens, so every completion token weighs the same whatever micro-batch it sits in (a mean
per micro-batch would over-weight short completions). Warmup + cosine LR; the optimizer, clipping, skipped
non-finite steps, atomic checkpoints for bit-exact `resume`, metrics.jsonl and the loop belong to the training
run (nanoseek/train/run.py). The routers' balancing biases stay frozen: fine-tuning data is too small and
skewed to rebalance on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..checkpoint import from_pretrained
from ..config import ConfigError, Validator, load_config
from ..data.dataset import IGNORE_INDEX
from ..data.tokenizer import TOKENIZER_FILE, Tokenizer
from ..fp8.convert import convert_to_fp8
from ..machine import PRECISIONS
from ..model.buckets import length_bucket_limit
from ..runtime import is_main_process
from ..train.metrics import write_plots
from ..train.run import TrainingRun
from ..train.schedule import lr_at
from ..train.state import save_model_dir
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
        precision: "auto" (bf16 where this machine's bf16 GEMMs are faster, else float32; nanoseek/machine.py),
            "float32", "bf16" (autocast; weights and optimizer state stay fp32) or "fp8" (FP8 projections
            and experts, nanoseek/fp8/convert.py; the rest in bf16 autocast).
        optimizer_moments: dtype of AdamW's two moments, "float32" or "bf16" (V3's low-precision optimizer states).
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
    optimizer_moments: str = "float32"
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    seed: int = 0
    threads: int = 0
    device: str | None = None
    max_examples: int | None = None

    def __post_init__(self):
        v = Validator(self)
        v.paths("data")
        v.one_of("template", TEMPLATES)
        v.ints("seq_len", "batch_size", "grad_accum", "log_every", "keep_checkpoints", "max_bad_steps")
        v.ints("save_every", "threads", "seed", minimum=0)
        v.ints("max_steps", "max_examples", optional=True)
        v.number("epochs", 0, open_low=True)
        v.number("lr", 0, open_low=True)
        v.number("min_lr_ratio", 0, 1)
        v.number("warmup_ratio", 0, 1, open_high=True)
        v.number("beta1", 0, 1, open_high=True)
        v.number("beta2", 0, 1, open_high=True)
        for f in ("weight_decay", "grad_clip", "mtp_lambda"):
            v.number(f, 0)
        v.one_of("precision", PRECISIONS)
        v.one_of("optimizer_moments", ("float32", "bf16"))
        v.flags("packing")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, defaults: dict | None = None, **overrides):
        """Defaults <- `defaults` <- JSON/TOML file <- overrides (None values are ignored), like TrainConfig.load."""
        return load_config(cls, path, overrides, defaults)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        self.cfg, self.out = cfg, out
        # under torchrun: data parallel with whole weights on every rank (each its rows of every micro-batch)
        self.run = run = TrainingRun(out, seed=cfg.seed, device=cfg.device, threads=cfg.threads, resume=resume,
                                     progress=progress, label=self.name, keep_checkpoints=cfg.keep_checkpoints,
                                     max_bad_steps=cfg.max_bad_steps, replicate=True)
        model, self.tokenizer = load_init(run.checkpoint or init)
        if self.tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer in {init} has {self.tokenizer.vocab_size} ids but the model only "
                             f"{model.cfg.vocab_size}: they do not belong together")
        if cfg.seq_len > model.cfg.max_position_embeddings:
            raise ConfigError(f"{type(cfg).__name__}.seq_len {cfg.seq_len} exceeds the model's "
                              f"max_position_embeddings {model.cfg.max_position_embeddings}")
        self.examples = load_examples(cfg, self.tokenizer)
        self.batches = SFTBatches([len(ex.tokens) for ex in self.examples], cfg.batch_size, cfg.seed, cfg.packing)
        self.max_steps = cfg.max_steps or math.ceil(cfg.epochs * self.batches.per_epoch / cfg.grad_accum)
        self.warmup = round(cfg.warmup_ratio * self.max_steps)
        self.precision = run.resolve_precision(cfg.precision)
        if self.precision == "fp8":  # a transform of the built model, before parallelism and the optimizer
            convert_to_fp8(model)
        # micro-batches padded to bucketed lengths where GEMMs build a kernel per shape (nanoseek/model/buckets.py)
        self.bucket_limit = length_bucket_limit(self.precision, run.device, cfg.seq_len)
        state = run.attach(model, self.tokenizer, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                           weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, moments=cfg.optimizer_moments)
        self.model = run.model
        self.tokens_seen = state.get("tokens_seen", 0)
        if state:
            self.batches.load_state_dict(state["data"])

    # ---- the objective --------------------------------------------------------------------------
    def loss_weights(self) -> dict[str, float]:
        """Weight of each loss part in the step's loss."""
        return {"lm_loss": 1.0, "mtp_loss": self.cfg.mtp_lambda}

    def part_names(self) -> list[str]:
        """The loss parts `loss_parts` returns, in order."""
        return ["lm_loss"] + (["mtp_loss"] if self.cfg.mtp_lambda > 0 and len(self.model.mtp) else [])

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

    def _loss(self, batch, n_tokens: int, weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        input_ids, labels = batch
        parallel = self.run.parallel
        if parallel is not None:
            # this rank's rows of the micro-batch; their token sums, over the whole step's tokens, times the ranks:
            # the gradient all-reduce averages, so the step's gradient is the single-process one
            mine = slice(parallel.dp_rank, None, parallel.dims.dp)
            input_ids, labels = input_ids[mine], labels[mine]
            n_tokens = n_tokens / parallel.dims.dp
            if not len(input_ids):
                zero = torch.zeros((), device=labels.device, requires_grad=True)
                return zero, {"loss": 0.0, **dict.fromkeys(self.part_names(), 0.0)}  # a micro-batch of < dp rows
        with torch.autocast(self.run.device.type, dtype=torch.bfloat16, enabled=self.precision in ("bf16", "fp8")):
            parts, _ = self.loss_parts(input_ids, labels, n_tokens)
            loss = sum(weights[k] * v for k, v in parts.items())
        return loss, {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One optimizer step over grad_accum micro-batches: its metrics row, or None when it was skipped."""
        return self.run.run_step(self._step)

    def _step(self) -> dict | None:
        cfg, run = self.cfg, self.run
        self.model.train()
        lr = lr_at(run.step, self.max_steps, cfg.lr, self.warmup, "cosine", cfg.min_lr_ratio)
        t0 = time.perf_counter()
        micro = [tuple(t.to(run.device) for t in collate_examples([self.examples[i] for i in next(self.batches)],
                                                                  self.tokenizer.pad_id, self.bucket_limit))
                 for _ in range(cfg.grad_accum)]
        n_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in micro)
        weights = self.loss_weights()
        totals = run.accumulate(micro, lambda b: self._loss(b, n_tokens, weights))
        if totals is None:
            return None
        grad_norm = run.optimizer_step(lr)
        seen = sum(int((ids != self.tokenizer.pad_id).sum()) for ids, _ in micro)  # real tokens, padding excluded
        self.tokens_seen += seen
        return {"epoch": round(self.batches.progress, 4), **totals, "lr": lr, "grad_norm": grad_norm,
                "completion_tokens": n_tokens, "tokens": self.tokens_seen,
                "tokens_per_s": seen / (time.perf_counter() - t0)}

    # ---- what the run's loop asks for -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"data": self.batches.state_dict(), "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict()}

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.3f}", "lr": f"{row['lr']:.1e}"}

    def log_line(self, row: dict) -> str:
        return _log_line(row)

    def fit(self) -> dict:
        """Train to max_steps, checkpointing on the way; write out/model/; return the last metrics row."""
        last = self.run.fit(self, self.max_steps, self.cfg.save_every, self.cfg.log_every)
        save_model_dir(self.model, self.tokenizer, os.path.join(self.out, "model"))
        if is_main_process():
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
