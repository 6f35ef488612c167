"""The one training-run layer: everything a training command does that is not its data or its loss.

Pretraining (train/trainer.py), SFT and distillation (rl/sft.py, rl/distill.py) and GRPO (rl/grpo.py) build
their data, their model and their loss; a TrainingRun owns the rest:
- the process: the local rank's device, seeds of every RNG, CPU threads (nanoseek/runtime.py);
- the optimizer: AdamW with weight decay on matrices only, the learning rate of each step, global-norm
  clipping, and its step hook, ExpertLoad (the routing counters all-reduced, the aux-loss-free bias update);
- non-finite losses: the step's gradients dropped and counted, TrainingAborted after max_bad_steps in a row;
- checkpoints: written by rank 0 only, atomically, with the optimizer state keyed by parameter name and every
  RNG (train/state.py); `resume` continues from the newest complete one, bit for bit;
- the loop: the step counter, metrics.jsonl, TensorBoard and the progress bar (rank 0), log lines,
  checkpoint cadence.

A command hands the run a Recipe (one step at a time, and its own resumable state). Within a step it calls
`accumulate` (forward/backward over micro-batches) and `optimizer_step` as often as its algorithm needs
(GRPO: `mu` updates per rollout).

Parallelism and FP8 are transforms of the built model, applied before `attach` builds the optimizer over its
parameters, in the style of torchtitan's parallelize/convert functions: `apply_fsdp(model, mesh)`,
`apply_ep(model, mesh)`, a pipeline split, `convert_to_fp8(model, cfg)`. They are not built yet; `attach`
is where they will be called (docs/design/training.md). The model package never imports torch.distributed.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Iterable, Protocol

import torch
from tqdm import tqdm

from ..machine import attention_core_dtype, resolve_compile_rollouts, resolve_precision
from ..model.mla import set_core_dtype
from ..runtime import is_main_process, local_device, seed_everything, set_threads
from .adamw_bf16 import AdamWBF16Moments
from .balance import ExpertLoad
from .metrics import MetricsLog
from .state import (DCP_DIR, list_checkpoints, load_checkpoint_model, load_trainer_state, newest_resumable,
                    remove_stale_tmp, save_checkpoint)


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite losses."""


class Recipe(Protocol):
    """What a training command gives its run's loop."""

    def train_step(self) -> dict | None:
        """One step of the loop, through `TrainingRun.run_step`: its metrics row, or None when it was skipped."""

    def state_dict(self) -> dict:
        """The command's own resumable state (data position, counters), saved with every checkpoint."""

    def log_line(self, row: dict) -> str:
        """The line printed every log_every steps."""

    def postfix(self, row: dict) -> dict:
        """What the progress bar shows after each step."""


def build_optimizer(params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float,
                    device: torch.device, moments: str = "float32") -> torch.optim.Optimizer:
    """AdamW with decay on matrices (dim >= 2) only; fused where torch has the kernel (cpu, cuda), which
    makes the step several times faster on CPU (benchmarks/README.md, "Figures cited from code"). `moments`
    "bf16" stores the two moments in bf16 (DeepSeek-V3's optimizer; nanoseek/train/adamw_bf16.py)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if moments == "bf16":
        return AdamWBF16Moments(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda"))


class TrainingRun:
    """One run of a training command in `out_dir` (checkpoints/, metrics.jsonl, tensorboard/).

    Args:
        out_dir: the output folder.
        seed: seeds every RNG at start (runtime.seed_everything).
        device: None: the local rank's GPU when there is one, else the CPU (runtime.local_device).
        threads: torch CPU threads (0: torch's default).
        resume: continue from the newest complete checkpoint in out_dir/checkpoints that loads (a warning names
            each newer one skipped; a warning when there is none, ValueError when none loads); `checkpoint` is
            then its folder, for the command to load its model from. Every start removes the `.tmp` folders of
            interrupted saves.
        progress: show a progress bar (rank 0).
        label: the progress bar's label.
        keep_checkpoints: complete checkpoints kept on disk.
        max_bad_steps: consecutive non-finite losses tolerated (each drops its step) before TrainingAborted.
        tensorboard: write TensorBoard scalars next to metrics.jsonl.
        parallel: the layout under torchrun, ParallelDims fields ({"dp_shard": 2, "ep": 2, ...}); a single process
            with no layout asked for runs as before, with no process group.
        replicate: keep whole weights on every rank (data parallelism by gradient all-reduce; SFT and GRPO).
    """

    def __init__(self, out_dir: str | os.PathLike, *, seed: int, device: str | None = None, threads: int = 0,
                 resume: bool = False, progress: bool = True, label: str = "train", keep_checkpoints: int = 2,
                 max_bad_steps: int = 5, tensorboard: bool = True, parallel: dict | None = None,
                 replicate: bool = False):
        self.out_dir = os.fspath(out_dir)
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        self.progress, self.label, self.keep_checkpoints = progress, label, keep_checkpoints
        self.max_bad_steps, self.tensorboard = max_bad_steps, tensorboard
        set_threads(threads)
        seed_everything(seed)
        self.device = local_device(device)
        self.parallel = _parallel(self.device, parallel or {}, replicate)
        if is_main_process():
            remove_stale_tmp(self.ckpt_dir)
        self.checkpoint: str | None = newest_resumable(self.ckpt_dir) if resume else None
        if resume and self.checkpoint is None:
            warnings.warn(f"resume: no complete checkpoint in {self.ckpt_dir}; starting afresh", stacklevel=3)
        self.step, self.bad_steps = 0, 0
        self.model = self.optimizer = self.tokenizer = self.metrics = None
        self.core_dtype: torch.dtype | None = None   # the attention core's, from resolve_precision
        self.balance = False

    # ---- set-up ---------------------------------------------------------------------------------
    def resolve_precision(self, precision: str) -> str:
        """`precision` with "auto" made concrete for this run's device (nanoseek/machine.py); with several ranks,
        bf16 only if every rank measured it faster (one collective), so that all of them compute alike. Under bf16
        on a CPU it also picks the attention core's dtype (machine.attention_core_dtype) and sets it on the model,
        now or when it is attached."""
        chosen = resolve_precision(precision, self.device)
        if precision == "auto":
            if not self._everywhere(chosen == "bf16"):
                chosen = "float32"
            if is_main_process():
                tqdm.write(f"{self.label}: precision auto -> {chosen} (the measurements: nanoseek info --machine)")
        # and the attention core's own dtype under bf16 on CPU (fp32 where it runs faster), alike on every rank
        core = attention_core_dtype(chosen, self.device)
        if self.device.type == "cpu" and chosen in ("bf16", "fp8") and not self._everywhere(core is not None):
            core = None
        self.core_dtype = core
        if self.model is not None:
            set_core_dtype(self.model, self.core_dtype)
        return chosen

    def resolve_compile_rollouts(self, choice: bool | str, decode_steps: int) -> bool:
        """`choice` with "auto" made concrete for a run of about `decode_steps` decode steps (nanoseek/machine.py);
        with several ranks, rank 0 alone takes the decode probe (ranks probing at once would time each other's
        load) and every rank follows its answer (one collective)."""
        if choice != "auto" or not self.parallel:
            return resolve_compile_rollouts(choice, self.device, decode_steps)
        chosen = is_main_process() and resolve_compile_rollouts(choice, self.device, decode_steps)
        flag = torch.tensor(float(chosen), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    def attach(self, model: torch.nn.Module, tokenizer, *, lr: float, betas: tuple[float, float],
               weight_decay: float, grad_clip: float, bias_gamma: Callable[[], float] | None = None,
               moments: str = "float32") -> dict:
        """Take the built model (moved to the run's device) and its tokenizer, build the optimizer, and restore
        the checkpoint's optimizer, RNG and step when resuming. Returns the command's own state saved with that
        checkpoint ({} for a fresh run).

        bias_gamma: the aux-loss-free bias update speed of the current step (None: the routing biases stay
            frozen; the counters are still read and zeroed every step). With it, the experts' loads go to
            expert_load.jsonl every log_every steps.
        moments: the AdamW moments' dtype, "float32" or "bf16" (build_optimizer).
        """
        self.model, self.tokenizer, self.grad_clip = model.to(self.device), tokenizer, grad_clip
        set_core_dtype(self.model, self.core_dtype)
        # the transforms of a built model (pipeline split, expert parallelism, FSDP2) happen here, before the
        # optimizer is built over the parameters they leave on this rank
        self.modules = self.parallel.prepare(self.model) if self.parallel else [self.model]
        params = [p for module in self.modules for p in module.parameters()]
        self.optimizer = build_optimizer(params, lr, betas, weight_decay, self.device, moments)
        state = {}
        if self.checkpoint is not None:
            state = load_trainer_state(self.checkpoint, self.modules, self.optimizer)
            self.step, self.bad_steps = state.pop("step"), state.pop("bad_steps", 0)
        layers = [layer for module in self.modules for layer in module.moe_layers()]
        group = self.parallel.dp_group if self.parallel else None
        self.expert_load = ExpertLoad(layers, bias_gamma or (lambda: 0.0), group)
        self.expert_load.attach(self.optimizer)
        self.balance = bias_gamma is not None
        if is_main_process():
            os.makedirs(self.out_dir, exist_ok=True)
            self.metrics = MetricsLog(self.out_dir, resume_step=self.step if self.checkpoint else None,
                                      tensorboard=self.tensorboard)
        return state

    # ---- within a step ----------------------------------------------------------------------------
    def run_step(self, step_fn: Callable[[], dict | None]) -> dict | None:
        """Run one loop step and advance the counter: {"step": the steps done, **its row}, or None (skipped)."""
        row = step_fn()
        self.step += 1
        return None if row is None else {"step": self.step, **row}

    def accumulate(self, micro_batches: Iterable, loss_fn: Callable) -> dict[str, float] | None:
        """Backward through the loss of every micro-batch. loss_fn(batch) -> (loss to backpropagate, {name: float
        to log}); returns the logged values summed over the micro-batches, or None when a loss was not finite:
        then the step's gradients and routing counts are dropped (the micro-batches after it are not drawn) and
        the bad step is counted."""
        totals: dict[str, float] = {}
        finite = True
        for batch in micro_batches:
            loss, logged = loss_fn(batch)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            for key, value in logged.items():
                totals[key] = totals.get(key, 0.0) + value
        if not self._everywhere(finite):
            self.drop_step()
            return None
        self.bad_steps = 0
        return self.parallel.mean_over_dp(totals) if self.parallel else totals

    def _everywhere(self, ok: bool) -> bool:
        """`ok` on every rank (one collective: a step is dropped on all ranks or on none)."""
        if not self.parallel:
            return ok
        flag = torch.tensor(float(ok))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag)

    def drop_step(self) -> None:
        """Drop the step's gradients and routing counts and count a bad step (TrainingAborted after
        max_bad_steps in a row)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.expert_load.reset()
        self.bad_steps += 1
        tqdm.write(f"warning: step {self.step}: non-finite loss, step skipped "
                   f"({self.bad_steps}/{self.max_bad_steps} in a row)")
        if self.bad_steps >= self.max_bad_steps:
            raise TrainingAborted(f"{self.bad_steps} consecutive non-finite losses at step {self.step}")

    def optimizer_step(self, lr: float) -> float:
        """Clip the global gradient norm to grad_clip (0: no clipping), step at `lr` (its hook updates the
        routing biases), zero the gradients; returns the norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.grad_clip if self.grad_clip > 0 else math.inf
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.parallel:
            self.parallel.finish_grads(params)
            grad_norm = self.parallel.clip_grad_norm_(params, clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ---- checkpoints and the loop -----------------------------------------------------------------
    def save(self, state: dict) -> str:
        """A checkpoint of the current step with the command's `state`: rank 0 writes it, or, when the
        parameters are sharded, every rank its shards (torch.distributed.checkpoint)."""
        sharded = self.modules if self.parallel and self.parallel.sharded else None
        return save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                               {**state, "bad_steps": self.bad_steps}, tokenizer=self.tokenizer,
                               keep=self.keep_checkpoints, sharded=sharded)

    def checkpoint_model(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The model of the checkpoint being resumed, on the run's device: loaded from its HF-format folder, or,
        for a sharded checkpoint, built from its config.json (the tensors arrive in `attach`)."""
        return load_checkpoint_model(self.checkpoint, dtype, self.device)

    def export(self, out: str | None = None) -> str | None:
        """After a sharded run: write the newest checkpoint's model as an HF-format folder (into that checkpoint
        folder unless `out` is given), so that nanoseek.from_pretrained and transformers load it."""
        if not (self.parallel and self.parallel.sharded):
            return None
        from ..dist.checkpoint import export_hf
        path = list_checkpoints(self.ckpt_dir)[-1]
        return export_hf(os.path.join(path, DCP_DIR), out or path, self.model.cfg, self.tokenizer)

    def fit(self, recipe: Recipe, max_steps: int, save_every: int, log_every: int = 0) -> dict:
        """Step until max_steps: metrics every step, a log line every log_every steps (0: none), a checkpoint
        every save_every steps (0: none) and at the end. Returns the last metrics row."""
        main = is_main_process()
        last: dict = {}
        bar = tqdm(total=max_steps, initial=self.step, desc=self.label, disable=not (self.progress and main),
                   dynamic_ncols=True)
        try:
            while self.step < max_steps:
                row = recipe.train_step()
                bar.update(1)
                if row is None:
                    continue
                last, at_end = row, self.step == max_steps
                if self.metrics is not None:
                    self.metrics.log(row)
                bar.set_postfix(recipe.postfix(row))
                if log_every and (self.step % log_every == 0 or at_end):
                    if self.metrics is not None and self.balance:
                        self.metrics.log_expert_load(self.step, self.expert_load.loads())
                    if main:
                        tqdm.write(recipe.log_line(row))
                if (save_every and self.step % save_every == 0) or at_end:
                    self.save(recipe.state_dict())
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return last


def _parallel(device: torch.device, layout: dict, replicate: bool):
    """The run's Parallel when it runs on several processes (torchrun) or asks for a layout; None otherwise."""
    from ..dist.parallel import init_distributed
    world = init_distributed(device)
    asked = {k: v for k, v in layout.items() if v not in (None, 1, -1, "1F1B")}
    if world == 1 and not asked:
        return None
    from ..dist import ParallelDims
    from ..dist.parallel import Parallel
    return Parallel(ParallelDims(world, **layout), device, replicate)
