"""Pretraining (`nanoseek train`): next-token loss plus the MTP objective (V3 report eq. 25), auxiliary-loss-free
bias balancing plus the sequence-wise balance loss (or the classic auxiliary loss, for comparison), warmup +
cosine/WSD learning rate, accumulation, optional bf16 autocast and periodic validation. Device, seeds, the
optimizer, checkpoints, exact resume, skipped non-finite steps and the loop belong to the training run
(train/run.py); this file is the data and the loss.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..checkpoint import from_pretrained
from ..config import ModelConfig
from ..model import Transformer, build_model
from ..runtime import is_main_process
from .balance import RoutingRecorder, batch_aux_loss, sequence_balance_loss
from .config import TrainConfig
from .data import TrainData, prepare_data
from .metrics import write_plots
from .run import TrainingAborted, TrainingRun
from .schedule import lr_at, piecewise

__all__ = ["Trainer", "TrainingAborted", "flops_per_token", "language_model_losses", "measure_peak_gflops"]


def language_model_losses(model: Transformer, input_ids: torch.Tensor, labels: torch.Tensor,
                          mtp: bool = True) -> tuple[torch.Tensor, list]:
    """Main-head cross-entropy and the per-depth MTP cross-entropies (labels[:, i] is token i+1;
    IGNORE_INDEX targets are skipped). Depth k at position i sees tokens up to i+k and predicts token
    i+k+1, i.e. labels[:, i+k] (V3 report eqs. 21-24)."""
    h = model.hidden_states(input_ids)
    lm = F.cross_entropy(model.lm_head(h).flatten(0, 1).float(), labels.flatten())
    mtp_losses = []
    if mtp and len(model.mtp):
        for k, h_k in enumerate(model.mtp_hidden_states(h, input_ids), start=1):
            logits = model.lm_head(h_k).flatten(0, 1).float()
            mtp_losses.append(F.cross_entropy(logits, labels[:, k:].flatten()))
    return lm, mtp_losses


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: 6 x activated matmul parameters (embedding lookup excluded) plus causal
    attention, 6 x layers x heads x (T/2) x (qk_head_dim + v_head_dim) (forward 2x, backward 4x)."""
    cfg = model.cfg
    params = model.num_parameters(activated=True) - model.model.embed_tokens.weight.numel()
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (seq_len / 2) * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * params + attn


def measure_peak_gflops(seconds: float = 0.5, device: torch.device | str = "cpu") -> float:
    """fp32 matmul throughput of `device` on a 1024^3 product (for the MFU estimate)."""
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    a @ b
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    sync()
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e9


class Trainer:
    """Pretrain a model on cfg's data into `out_dir` (checkpoints/, metrics.jsonl, loss.png, expert_load.png).

    Args:
        cfg: the settings.
        out_dir: the output folder.
        resume: continue from the newest complete checkpoint in out_dir/checkpoints (bit-exact).
        progress: show a progress bar.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.run = run = TrainingRun(out_dir, seed=cfg.seed, device=cfg.device, threads=cfg.threads, resume=resume,
                                     progress=progress, label="train", keep_checkpoints=cfg.keep_checkpoints,
                                     max_bad_steps=cfg.max_bad_steps)
        self.data: TrainData = prepare_data(cfg, tokenizer_dir=run.checkpoint)
        if run.checkpoint is not None:
            model = from_pretrained(run.checkpoint, dtype=torch.float32, device=run.device)
        else:
            tok = self.data.tokenizer
            model_cfg = ModelConfig.preset(cfg.preset, **{**cfg.model, "vocab_size": tok.vocab_size,
                                                          "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                                          "pad_token_id": tok.pad_id})
            if model_cfg.max_position_embeddings < cfg.seq_len:
                raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                                 f"{model_cfg.max_position_embeddings}")
            model = build_model(model_cfg, seed=cfg.seed, device=run.device)
        state = run.attach(model, self.data.tokenizer, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                           weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, bias_gamma=self._bias_gamma)
        if state:
            self.data.train.load_state_dict(state["data"])
        self.model: Transformer = run.model
        self.routing = RoutingRecorder(self.model)
        self.flops_per_token = flops_per_token(self.model, cfg.seq_len)
        self.peak = cfg.peak_gflops or measure_peak_gflops(device=run.device)

    def _bias_gamma(self) -> float:
        """Aux-loss-free bias update speed of the current step (0 unless cfg.balance is aux_free)."""
        cfg = self.cfg
        if cfg.balance != "aux_free":
            return 0.0
        return piecewise(self.run.step, cfg.max_steps, cfg.bias_gamma, cfg.bias_gamma_late, cfg.gamma_switch_frac)

    # ---- the loss of one micro-batch --------------------------------------------------------------
    def _loss(self, batch, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, device = self.cfg, self.run.device
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            lm, mtp_losses = language_model_losses(self.model, batch.input_ids, batch.labels, mtp=lam > 0)
            routing = self.routing.take()
            loss, mtp = lm, None
            if mtp_losses:
                mtp = torch.stack(mtp_losses).mean()
                loss = loss + lam * mtp                       # (lambda / D) * sum_k L_MTP^k
            balance = torch.zeros(())
            if cfg.balance == "aux_free" and cfg.seq_aux_alpha > 0:
                balance = sequence_balance_loss(routing, batch.input_ids.shape[0], cfg.seq_aux_alpha)
            elif cfg.balance == "aux_loss":
                balance = batch_aux_loss(routing, cfg.aux_loss_alpha)
            loss = loss + balance
        n = cfg.grad_accum
        logged = {"loss": loss.item() / n, "lm_loss": lm.item() / n}
        if mtp is not None:
            logged["mtp_loss"] = mtp.item() / n
        logged["balance_loss"] = balance.item() / n
        return loss / n, logged

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One optimizer step over grad_accum micro-batches (validation included when it is due); its metrics
        row, or None when a non-finite loss skipped it."""
        return self.run.run_step(self._step)

    def _step(self) -> dict | None:
        cfg, run = self.cfg, self.run
        self.model.train()
        lam = piecewise(run.step, cfg.max_steps, cfg.mtp_lambda, cfg.mtp_lambda_late, cfg.mtp_switch_frac)
        lr = lr_at(run.step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        t0 = time.perf_counter()
        totals = run.accumulate((next(self.data.train) for _ in range(cfg.grad_accum)), lambda b: self._loss(b, lam))
        if totals is None:
            return None
        grad_norm = run.optimizer_step(lr)
        dt = time.perf_counter() - t0
        tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
        row = {**totals, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
               "mfu": tokens / dt * self.flops_per_token / (self.peak * 1e9)}
        vio = run.expert_load.max_vio()
        if vio:
            row["max_vio"] = sum(vio.values()) / len(vio)
            row["max_vio_per_layer"] = vio
        done = run.step + 1
        if (cfg.val_every and done % cfg.val_every == 0) or done == cfg.max_steps:
            row["val_loss"] = self.validate()
        return row

    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        losses = [language_model_losses(self.model, b.input_ids, b.labels, mtp=False)[0].item()
                  for b in (batch.to(self.run.device) for batch in self.data.val_batches(self.cfg.batch_size,
                                                                                          self.cfg.val_batches))]
        return sum(losses) / max(1, len(losses))

    # ---- what the run's loop asks for -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"data": self.data.train.state_dict(), "train_config": self.cfg.to_dict()}

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.3f}", "lr": f"{row['lr']:.1e}"}

    def log_line(self, row: dict) -> str:
        return _log_line(row)

    def fit(self) -> dict:
        """Train to cfg.max_steps; write loss.png and expert_load.png; return the last metrics row."""
        cfg = self.cfg
        last = self.run.fit(self, cfg.max_steps, cfg.save_every, cfg.log_every)
        if is_main_process():
            write_plots(self.run.out_dir)
        return last


def _log_line(row: dict) -> str:
    parts = [f"step {row['step']:>6}", f"loss {row['loss']:.4f}", f"lm {row['lm_loss']:.4f}"]
    if "mtp_loss" in row:
        parts.append(f"mtp {row['mtp_loss']:.4f}")
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.4f}")
    if "max_vio" in row:
        parts.append(f"maxvio {row['max_vio']:.3f}")
    parts += [f"lr {row['lr']:.2e}", f"gnorm {row['grad_norm']:.2f}", f"{row['tokens_per_s']:.0f} tok/s",
              f"mfu {100 * row['mfu']:.1f}%"]
    return " | ".join(parts)
