"""The `sft` and `distill` command-line stages (wired into nanoseek/cli.py through `add_parsers`).

- sft: fine-tune a checkpoint on SFT rows (cold start, rejection-sampled data) -> OUT/model/.
- distill: train a dense student on a teacher's traces (+ optional token-level KD) -> OUT/model/.
Settings come from the config dataclass defaults, then an optional JSON/TOML file (--config), then
the flags given; bad input surfaces as ValueError/FileNotFoundError/ConfigError with a one-line
message for the main CLI to print.
"""

from __future__ import annotations

import argparse

from ..machine import COMMAND_DEFAULTS, PRECISIONS


def add_parsers(sub) -> None:
    """Register the sft and distill sub-commands on an argparse sub-parsers object."""
    p = sub.add_parser("sft", help="supervised fine-tuning on chat/prompt-completion rows (loss on completions)")
    p.add_argument("--init", required=True, help="HF-format checkpoint folder with tokenizer.json to fine-tune")
    _common_flags(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("distill", help="train a smaller dense student on a teacher's traces (optional logit KD)")
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint folder: its tokenizer for a fresh student, its logits for --kd-alpha > 0")
    p.add_argument("--student-init", default=None, help="start from this student checkpoint instead of a fresh one")
    p.add_argument("--student-preset", default=None, help="preset of a fresh student (default: small, made dense)")
    p.add_argument("--kd-alpha", type=float, default=None,
                   help="weight of token-level KL(teacher||student); 0 = sequence-level only, as R1 (default: 0)")
    p.add_argument("--kd-temperature", type=float, default=None, help="KD softmax temperature (default: 1.0)")
    _common_flags(p)
    p.set_defaults(func=cmd_distill)


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", default=None,
                   help=".jsonl/.parquet SFT files, rows {messages} or {prompt, completion}")
    p.add_argument("--out", required=True, help="output folder: model/, checkpoints/, metrics.jsonl, loss.png")
    p.add_argument("--config", default=None, help="a JSON or TOML config file (flags override it)")
    p.add_argument("--template", default=None, choices=["chat", "r1_zero"],
                   help="prompt template of 'messages' rows (default: chat)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="longest sequence in tokens; longer ones are truncated (default: 512)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch (default: 8)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: 1)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data (default: 2)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3)")
    p.add_argument("--mtp-lambda", type=float, default=None, help="MTP loss weight (default: 0, main head only)")
    p.add_argument("--no-packing", action="store_true", help="do not group examples of similar length")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N rows")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: 100)")
    p.add_argument("--seed", type=int, default=None, help="data order / student init seed (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="default: auto, bf16 where this machine's bf16 GEMMs are faster, else float32; fp8")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def _overrides(args) -> dict:
    return dict(data=args.data, template=args.template, seq_len=args.seq_len, batch_size=args.batch_size,
                grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                mtp_lambda=args.mtp_lambda, packing=False if args.no_packing else None,
                max_examples=args.max_examples, save_every=args.save_every, seed=args.seed, threads=args.threads,
                precision=args.precision)


def _report(trainer, last: dict, out: str) -> None:
    if last:
        print(f"done: step {last['step']}, loss {last['loss']:.4f}; model in {out}/model, "
              f"checkpoints in {trainer.run.ckpt_dir}, metrics in {out}/metrics.jsonl")


def cmd_sft(args) -> None:
    """Fine-tune --init on --data into --out."""
    from ..cli import require_folder
    from .sft import SFTConfig, SFTTrainer

    require_folder(args.out, "--out")
    cfg = SFTConfig.load(args.config, defaults=COMMAND_DEFAULTS, **_overrides(args))
    trainer = SFTTrainer(cfg, args.init, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"fine-tuning {args.init} ({trainer.model.num_parameters():,} parameters) on {len(trainer.examples):,} "
          f"examples for {trainer.max_steps} steps into {args.out}"
          + (f", resuming at step {trainer.run.step}" if trainer.run.step else ""))
    _report(trainer, trainer.fit(), args.out)


def cmd_distill(args) -> None:
    """Train a student on --data (the teacher's traces) into --out."""
    from ..cli import require_folder
    from .distill import Distiller, DistillConfig

    require_folder(args.out, "--out")
    cfg = DistillConfig.load(args.config, defaults=COMMAND_DEFAULTS, **_overrides(args), teacher=args.teacher,
                             student_init=args.student_init, student_preset=args.student_preset,
                             kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature)
    trainer = Distiller(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    kd = f", token-level KD alpha {cfg.kd_alpha} T {cfg.kd_temperature}" if cfg.kd_alpha > 0 else ""
    print(f"distilling into a {trainer.model.num_parameters():,}-parameter student on {len(trainer.examples):,} "
          f"examples for {trainer.max_steps} steps{kd} into {args.out}"
          + (f", resuming at step {trainer.run.step}" if trainer.run.step else ""))
    _report(trainer, trainer.fit(), args.out)
