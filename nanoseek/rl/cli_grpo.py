"""The `nanoseek grpo` stage: GRPO on verifiable problems from an HF-format checkpoint (nanoseek.rl.grpo).

Settings come from GRPOConfig defaults, then --config (JSON/TOML), then the flags given here; errors
in any of them are one-line ConfigError/ValueError messages that `nanoseek.cli.main` prints.
"""

from __future__ import annotations

from ..machine import COMMAND_DEFAULTS, COMPILE_CHOICES, ROLLOUT_DEFAULTS


def add_parsers(sub) -> None:
    """Register the `grpo` sub-command on an argparse sub-parsers object."""
    p = sub.add_parser("grpo", help="GRPO reinforcement learning on verifiable problems (R1 recipe)")
    p.add_argument("--init", required=True, help="HF-format model folder with tokenizer.json (e.g. nanoseek sft output)")
    p.add_argument("--out", required=True, help="output folder: metrics.jsonl, checkpoints/, model/, plots")
    p.add_argument("--config", default=None, help="JSON/TOML file of GRPOConfig fields (flags override it)")
    p.add_argument("--tasks", nargs="+", default=None, help="built-in tasks (default: arithmetic countdown linear)")
    p.add_argument("--data", nargs="+", default=None, help="jsonl/parquet problem files {question, answer}; replace --tasks")
    p.add_argument("--template", choices=["chat", "r1_zero"], default=None, help="prompt template (default: chat)")
    p.add_argument("--steps", type=int, default=None, help="rollout steps (default: 200)")
    p.add_argument("--group-size", type=int, default=None, help="completions per prompt G (default: 8)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per step (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest completion (default: 256)")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient; 0 loads no reference (default: 0)")
    p.add_argument("--loss-type", choices=["dapo", "grpo", "dr_grpo"], default=None, help="loss aggregation (default: dapo)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 4e-5)")
    p.add_argument("--mu", type=int, default=None, help="optimizer updates per rollout (default: 1)")
    p.add_argument("--equation-credit", type=float, default=None, metavar="WEIGHT",
                   help="per-step credit from checking each equation the completion writes (default: 0, off)")
    p.add_argument("--dynamic-sampling", type=int, default=None, metavar="ROUNDS",
                   help="extra rollout rounds per step that replace zero-variance groups (DAPO; default: 0, off)")
    p.add_argument("--positive-only", action="store_true", default=None,
                   help="train only on completions better than their group's mean (RAFT++; default: off)")
    p.add_argument("--precision", choices=["auto", "float32", "bf16"], default=None,
                   help="the update's forward/backward (default: auto, bf16 where this machine's bf16 GEMMs are "
                        "faster, else float32; nanoseek info --machine); rollouts decode in fp32")
    p.add_argument("--compile", nargs="?", const="on", choices=sorted(COMPILE_CHOICES), default=None,
                   help="decode rollouts through torch.compile: on (the flag alone), off, or auto (the default: "
                        "where a one-off probe finds that it pays for a run this long; nanoseek info --machine "
                        "--decode)")
    p.add_argument("--seed", type=int, default=None, help="problem order and sampling seed (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_grpo)


def cmd_grpo(args) -> None:
    """Run GRPO and print where the model, metrics and plots went."""
    from ..cli import require_folder
    from .grpo import GRPOConfig, GRPOTrainer

    require_folder(args.out, "--out")
    cfg = GRPOConfig.load(args.config, tasks=args.tasks, data=args.data, template=args.template, steps=args.steps,
                          group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                          max_new_tokens=args.max_new_tokens, beta=args.beta, loss_type=args.loss_type, lr=args.lr,
                          mu=args.mu, equation_credit=args.equation_credit,
                          dynamic_sampling=args.dynamic_sampling, positive_only=args.positive_only,
                          precision=args.precision, compile_rollouts=COMPILE_CHOICES.get(args.compile),
                          seed=args.seed, threads=args.threads, defaults={**COMMAND_DEFAULTS, **ROLLOUT_DEFAULTS})
    trainer = GRPOTrainer(cfg, args.init, args.out, resume=args.resume, progress=not args.no_progress)
    last = trainer.fit()
    if last:
        print(f"step {last['step']}: reward {last['reward']:.3f}, accuracy {last['accuracy']:.3f}, "
              f"completion length {last['completion_len_mean']:.1f}")
    print(f"model: {trainer.out}/model; metrics: {trainer.out}/metrics.jsonl; plots: {trainer.out}/reward.png, "
          f"{trainer.out}/length.png")
