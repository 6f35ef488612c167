"""Pretraining (`nanoseek train`): next-token loss plus the MTP objective (V3 report eq. 25), auxiliary-loss-free
bias balancing plus the sequence-wise balance loss (or the classic auxiliary loss, for comparison), warmup +
cosine/WSD learning rate, accumulation, optional bf16 autocast and periodic validation; continued training from an
earlier model (`init_from`, e.g. a YaRN context extension) and the two DeepSeek Sparse Attention stages
(`dsa_stage`, train/dsa.py). Device, seeds, the
optimizer, checkpoints, exact resume, skipped non-finite steps and the loop belong to the training run
(train/run.py); this file is the data and the loss.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from ..checkpoint import from_pretrained
from ..config import ConfigError, ModelConfig
from ..fp8.convert import convert_to_fp8
from ..model import Transformer, build_model
from ..model.indexer import IndexerRecorder
from ..runtime import is_main_process
from .balance import RoutingRecorder, batch_aux_loss, sequence_balance_loss
from .config import TrainConfig
from .data import TrainData, prepare_data
from .dsa import indexer_kl_loss, prepare_step
from .loss import linear_cross_entropy
from .metrics import write_plots
from .pipelined import PipelinedPretraining
from .run import TrainingAborted, TrainingRun
from .schedule import lr_at, piecewise
from .state import read_trainer_json

__all__ = ["Trainer", "TrainingAborted", "flops_per_token", "language_model_losses", "measure_peak_gflops"]


def language_model_losses(model: Transformer, input_ids: torch.Tensor, labels: torch.Tensor,
                          mtp: bool = True, recorder: IndexerRecorder | None = None) -> tuple[torch.Tensor, list]:
    """Main-head cross-entropy and the per-depth MTP cross-entropies (labels[:, i] is token i+1;
    IGNORE_INDEX targets are skipped). Depth k at position i sees tokens up to i+k and predicts token
    i+k+1, i.e. labels[:, i+k] (V3 report eqs. 21-24). `recorder`: collects the DSA indexers' KL terms."""
    h = model.hidden_states(input_ids, recorder=recorder)
    lm = linear_cross_entropy(h.flatten(0, 1), model.lm_head, labels.flatten())
    mtp_losses = []
    if mtp and len(model.mtp):
        for k, h_k in enumerate(model.mtp_hidden_states(h, input_ids, recorder), start=1):
            mtp_losses.append(linear_cross_entropy(h_k.flatten(0, 1), model.lm_head, labels[:, k:].flatten()))
    return lm, mtp_losses


def continued_model(cfg: TrainConfig, vocab: int, device: torch.device) -> Transformer:
    """The model of cfg.init_from with cfg.model's overrides applied, for continued training: its weights, plus
    a fresh indexer (drawn from cfg.seed) when the overrides add DSA. Overrides may add the indexer or change
    what has no weights (index_topk, rope_scaling, max_position_embeddings: a YaRN context extension); any
    other change, or a tokenizer larger than its vocabulary, is a ValueError."""
    base = from_pretrained(cfg.init_from, dtype=torch.float32, device=device)
    model_cfg = base.cfg.replace(**cfg.model)
    if model_cfg.max_position_embeddings < cfg.seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{model_cfg.max_position_embeddings}; raise it (and set YaRN rope_scaling) in "
                         "TrainConfig.model")
    if vocab > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} tokens, more than the vocabulary ({model_cfg.vocab_size}) of "
                         f"{cfg.init_from}; use the tokenizer it was trained with")
    model = build_model(model_cfg, seed=cfg.seed, device=device)
    try:
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise ValueError(f"TrainConfig.model {cfg.model} changes weight shapes of {cfg.init_from}: {e}") from None
    changed = unexpected + [k for k in missing if ".indexer." not in k]
    if changed:
        raise ValueError(f"TrainConfig.model {cfg.model} does not fit {cfg.init_from}: {', '.join(changed[:4])}")
    return model


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
        layout = {k: getattr(cfg, k) for k in ("dp_shard", "dp_replicate", "ep", "pp", "pp_schedule")}
        self.run = run = TrainingRun(out_dir, seed=cfg.seed, device=cfg.device, threads=cfg.threads, resume=resume,
                                     progress=progress, label="train", keep_checkpoints=cfg.keep_checkpoints,
                                     max_bad_steps=cfg.max_bad_steps, parallel=layout)
        if run.parallel:
            run.parallel.check_batch(cfg.batch_size)
            if cfg.compile:
                raise ValueError("TrainConfig.compile runs in one process only (compiling around FSDP2 and the "
                                 "expert all-to-all is not covered yet)")
        if run.checkpoint is not None:
            _check_same_model(cfg, run.checkpoint)
        self.data: TrainData = prepare_data(cfg, tokenizer_dir=run.checkpoint)
        if run.checkpoint is not None:
            model = run.checkpoint_model()
        elif cfg.init_from is not None:
            model = continued_model(cfg, self.data.tokenizer.vocab_size, run.device)
        else:
            tok = self.data.tokenizer
            model_cfg = ModelConfig.preset(cfg.preset, **{**cfg.model, "vocab_size": tok.vocab_size,
                                                          "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                                          "pad_token_id": tok.pad_id})
            if model_cfg.max_position_embeddings < cfg.seq_len:
                raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                                 f"{model_cfg.max_position_embeddings}")
            model = build_model(model_cfg, seed=cfg.seed, device=run.device)
        self.precision = run.resolve_precision(cfg.precision)
        if self.precision == "fp8":  # a transform of the built model, before parallelism and the optimizer
            convert_to_fp8(model)
        state = run.attach(model, self.data.tokenizer, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                           weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, bias_gamma=self._bias_gamma,
                           moments=cfg.optimizer_moments)
        if state:
            self.data.train.load_state_dict(state["data"])
        self.model: Transformer = run.model
        self.routing = RoutingRecorder(self.model)
        # a transform like fp8 and parallelism: the model stays an eager module; the loss's forward is compiled
        self._losses = torch.compile(language_model_losses) if cfg.compile else language_model_losses
        self.pipelined = None
        if run.parallel and run.parallel.dims.pp > 1:
            self.pipelined = PipelinedPretraining(cfg, run.parallel, len(self.model.moe_layers()),
                                                  self.model.cfg.num_nextn_predict_layers > 0)
        self.flops_per_token = flops_per_token(self.model, cfg.seq_len)
        world = run.parallel.dims.world_size if run.parallel else 1
        self.peak = (cfg.peak_gflops or measure_peak_gflops(device=run.device)) * world  # every device's peak

    def _bias_gamma(self) -> float:
        """Aux-loss-free bias update speed of the current step (0 unless cfg.balance is aux_free)."""
        cfg = self.cfg
        if cfg.balance != "aux_free" or cfg.dsa_stage == "dense_warmup":   # the warm-up freezes the router
            return 0.0
        return piecewise(self.run.step, cfg.max_steps, cfg.bias_gamma, cfg.bias_gamma_late, cfg.gamma_switch_frac)

    # ---- the loss of one micro-batch --------------------------------------------------------------
    def _local(self, batch):
        """This rank's rows of a global batch, on the run's device."""
        batch = batch.to(self.run.device)
        parallel = self.run.parallel
        return batch if parallel is None else type(batch)(*(parallel.rows(getattr(batch, f.name))
                                                               for f in dataclasses.fields(batch)))

    def _loss(self, batch, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, device = self.cfg, self.run.device
        batch = self._local(batch)
        warmup = cfg.dsa_stage == "dense_warmup"
        recorder = IndexerRecorder(dense=warmup) if cfg.dsa_stage != "none" else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision in ("bf16", "fp8")):
            if recorder is None:
                lm, mtp_losses = self._losses(self.model, batch.input_ids, batch.labels, mtp=lam > 0)
            else:
                lm, mtp_losses = language_model_losses(self.model, batch.input_ids, batch.labels, mtp=lam > 0,
                                                       recorder=recorder)
            routing = self.routing.take()
            loss, mtp = lm, None
            if mtp_losses:
                mtp = torch.stack(mtp_losses).mean()
                loss = loss + lam * mtp                       # (lambda / D) * sum_k L_MTP^k
            balance = torch.zeros(())
            if warmup:
                pass                                          # frozen router: no balance term
            elif cfg.balance == "aux_free" and cfg.seq_aux_alpha > 0:
                balance = sequence_balance_loss(routing, batch.input_ids.shape[0], cfg.seq_aux_alpha)
            elif cfg.balance == "aux_loss":
                balance = batch_aux_loss(routing, cfg.aux_loss_alpha)
            loss = loss + balance
            if recorder is not None:
                # only the indexers get this gradient (their inputs are detached); in the warm-up it is the
                # whole objective, the language-model terms are logged only (V3.2 report §2.1)
                kl = indexer_kl_loss(recorder.take())
                loss = kl if warmup else loss + kl
        n = cfg.grad_accum
        logged = {"loss": loss.item() / n, "lm_loss": lm.item() / n}
        if mtp is not None:
            logged["mtp_loss"] = mtp.item() / n
        logged["balance_loss"] = balance.item() / n
        if recorder is not None:
            logged["indexer_kl"] = kl.item() / n
        return loss / n, logged

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One optimizer step over grad_accum micro-batches (validation included when it is due); its metrics
        row, or None when a non-finite loss skipped it."""
        return self.run.run_step(self._step)

    def _step(self) -> dict | None:
        cfg, run = self.cfg, self.run
        for module in run.modules:
            module.train()
        if cfg.dsa_stage != "none":
            prepare_step(self.model, cfg.dsa_stage)
        lam = piecewise(run.step, cfg.max_steps, cfg.mtp_lambda, cfg.mtp_lambda_late, cfg.mtp_switch_frac)
        lr = lr_at(run.step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        t0 = time.perf_counter()
        batches = (next(self.data.train) for _ in range(cfg.grad_accum))
        if self.pipelined is not None:
            totals = self.pipelined.step(run, batches, lam)
        else:
            totals = run.accumulate(batches, lambda b: self._loss(b, lam))
        if totals is None:
            return None
        grad_norm = run.optimizer_step(lr)
        dt = time.perf_counter() - t0
        tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
        row = {**totals, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
               "mfu": tokens / dt * self.flops_per_token / (self.peak * 1e9)}
        vio = run.expert_load.max_vio()
        if run.parallel and run.parallel.dims.pp > 1:
            vio = run.parallel.merge_over_pp(vio)
        if vio:
            row["max_vio"] = sum(vio.values()) / len(vio)
            row["max_vio_per_layer"] = vio
        done = run.step + 1
        if (cfg.val_every and done % cfg.val_every == 0) or done == cfg.max_steps:
            row["val_loss"] = self.validate()
        return row

    @torch.no_grad()
    def validate(self) -> float:
        batches = self.data.val_batches(self.cfg.batch_size, self.cfg.val_batches)
        if self.pipelined is not None:
            return self.pipelined.validation_loss(self.run, batches)
        self.model.eval()
        losses = [language_model_losses(self.model, b.input_ids, b.labels, mtp=False)[0].item()
                  for b in map(self._local, batches)]
        mean = sum(losses) / max(1, len(losses))
        return self.run.parallel.mean_over_dp({"val": mean})["val"] if self.run.parallel else mean

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
        self.run.export()  # a sharded run's last checkpoint gets HF-format weights too
        if is_main_process():
            write_plots(self.run.out_dir)
        return last


def _check_same_model(cfg: TrainConfig, checkpoint: str) -> None:
    """A resumed run continues the checkpoint's model, so a preset or model override other than the one it was
    trained with would be silently ignored: refuse it, naming the flag and the value to resume with."""
    saved = read_trainer_json(checkpoint).get("train_config")
    if not saved:
        return  # a checkpoint written before the train config was saved with it
    if saved.get("preset") != cfg.preset:
        raise ConfigError(f"TrainConfig.preset (--preset) is {cfg.preset!r}, but {checkpoint} was trained with "
                          f"{saved.get('preset')!r}: resume with --preset {saved.get('preset')}, or train into a new "
                          "--out")
    if json.loads(json.dumps(cfg.model)) != saved.get("model", {}):
        raise ConfigError(f"TrainConfig.model is {cfg.model}, but {checkpoint} was trained with {saved.get('model')}: "
                          "resume with the same model overrides, or train into a new --out")


def _log_line(row: dict) -> str:
    parts = [f"step {row['step']:>6}", f"loss {row['loss']:.4f}", f"lm {row['lm_loss']:.4f}"]
    if "mtp_loss" in row:
        parts.append(f"mtp {row['mtp_loss']:.4f}")
    if "indexer_kl" in row:
        parts.append(f"kl {row['indexer_kl']:.4f}")
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.4f}")
    if "max_vio" in row:
        parts.append(f"maxvio {row['max_vio']:.3f}")
    parts += [f"lr {row['lr']:.2e}", f"gnorm {row['grad_norm']:.2f}", f"{row['tokens_per_s']:.0f} tok/s",
              f"mfu {100 * row['mfu']:.1f}%"]
    return " | ".join(parts)
