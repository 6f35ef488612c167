"""The `sample`, `eval` and `r1` command-line stages (wired into nanoseek/cli.py through `add_parsers`).

- sample: rejection sampling from a checkpoint into an SFT data set (jsonl rows for `nanoseek sft`).
- eval: held-out pass@1 / maj@k of a checkpoint on the built-in tasks or a problem file.
- r1: the whole R1 recipe on the embedded default (nanoseek/rl/pipeline.py), resumable per stage.
"""

from __future__ import annotations

import json
import os

from ..machine import COMMAND_DEFAULTS, COMPILE_CHOICES, PRECISIONS, ROLLOUT_DEFAULTS


def add_parsers(sub) -> None:
    p = sub.add_parser("sample", help="rejection sampling: k samples per problem, keep correct ones as SFT data")
    p.add_argument("--model", required=True, help="checkpoint folder (with tokenizer.json) to sample from")
    p.add_argument("--out", required=True, help="jsonl file to write (chat rows for `nanoseek sft`)")
    _problem_flags(p, split_default="train", n_default=200)
    p.add_argument("--k", type=int, default=8, help="samples per problem (default: 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="budget per sample (default: 256)")
    p.add_argument("--max-per-problem", type=int, default=2, help="most samples kept per problem (default: 2)")
    p.add_argument("--max-repetition", type=float, default=0.5,
                   help="largest accepted share of repeated word 3-grams (default: 0.5)")
    _allow_non_finite_flag(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="held-out pass@1 and maj@k of a checkpoint (R1 protocol)")
    p.add_argument("--model", required=True, help="checkpoint folder (with tokenizer.json)")
    _problem_flags(p, split_default="test", n_default=50)
    p.add_argument("--k", type=int, default=4, help="samples per problem (default: 4)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default: 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="budget per sample (default: 256)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _allow_non_finite_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("r1", help="the whole R1 recipe, stage by stage, with report.md/report.json (resumable)")
    p.add_argument("--out", default="runs/r1", help="run folder (default: runs/r1); rerun to resume")
    p.add_argument("--config", default=None, help="JSON/TOML file of R1Config fields (stage dicts merge into defaults)")
    p.add_argument("--stages", nargs="+", default=None, help="run only these stages (default: all, in order)")
    p.add_argument("--scale", type=float, default=None,
                   help="multiply steps, data and eval sizes (default 1: 25-56 min on 2 CPU cores; GPUs: e.g. 10)")
    p.add_argument("--preset", default=None, help="teacher model preset (default: small)")
    p.add_argument("--seed", type=int, default=None, help="seed of every stage (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="training precision of every stage (default: auto, bf16 where faster here, else float32)")
    p.add_argument("--compile", nargs="?", const="on", choices=sorted(COMPILE_CHOICES), default=None,
                   help="the RL stages' rollouts through torch.compile: on (the flag alone), off, or auto (the "
                        "default: where a one-off probe finds that it pays; nanoseek info --machine --decode)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.set_defaults(func=cmd_r1)


def _problem_flags(p, split_default: str, n_default: int) -> None:
    p.add_argument("--tasks", nargs="+", default=["arithmetic", "countdown", "linear"],
                   help="built-in tasks (default: all three)")
    p.add_argument("--difficulty", type=int, default=None, help="task level (default: all levels mixed)")
    p.add_argument("--n", type=int, default=n_default, help=f"problems per task (default: {n_default})")
    p.add_argument("--split", default=split_default, choices=["train", "test"],
                   help=f"which split of the built-in tasks (default: {split_default})")
    p.add_argument("--data", default=None, help="a .jsonl/.parquet problem file ({question, answer}) instead of --tasks")
    p.add_argument("--template", default="chat", choices=["chat", "r1_zero"], help="prompt template (default: chat)")
    p.add_argument("--seed", type=int, default=0, help="problem selection and sampling seed (default: 0)")


def _allow_non_finite_flag(p) -> None:
    p.add_argument("--allow-non-finite", action="store_true",
                   help="load weights holding NaN/Inf (default: refuse them, naming the tensor)")


def _problems(args):
    from .data import load_problems, task_examples
    if args.data:
        return load_problems(args.data)
    return task_examples(args.tasks, args.split, args.n, args.difficulty, seed=args.seed)


def _load_model(args):
    """The --model checkpoint on this process's device (as sample_problems would load it) and its tokenizer."""
    from ..checkpoint import from_pretrained
    from ..data.tokenizer import Tokenizer
    from ..runtime import local_device

    tokenizer = Tokenizer.load(args.model)
    return from_pretrained(args.model, device=local_device(), allow_non_finite=args.allow_non_finite), tokenizer


def cmd_sample(args) -> None:
    from ..cli import require_flags
    from .data import write_rows
    from .sample import SampleConfig, rejection_sample

    cfg = SampleConfig(k=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                       max_per_problem=args.max_per_problem, max_repetition=args.max_repetition,
                       template=args.template, seed=args.seed)
    require_flags(args, n=1)
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a folder; it must name the .jsonl file to write")
    problems = _problems(args)
    model, tokenizer = _load_model(args)
    rows, stats = rejection_sample(model, tokenizer, problems, cfg)
    write_rows(args.out, rows)
    rejected = {k: v for k, v in stats.items() if k not in ("samples", "kept", "kept_per_task", "problems")}
    print(f"kept {stats['kept']} of {stats['samples']} samples from {stats['problems']} problems "
          f"(per task {stats['kept_per_task']}; rejected {rejected}) -> {args.out}")


def cmd_eval(args) -> None:
    from ..cli import require_flags
    from .evaluate import EvalConfig, evaluate

    cfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                     template=args.template, seed=args.seed)
    require_flags(args, n=1)
    problems = _problems(args)
    model, tokenizer = _load_model(args)
    result = evaluate(model, tokenizer, problems, cfg)
    if args.json:
        print(json.dumps(result["tasks"], indent=1))
        return
    for task, m in result["tasks"].items():
        print(f"{task:12s} pass@1 {m['pass@1']:.3f}  maj@{cfg.k} {m['maj@k']:.3f}  format {m['format']:.2f}  "
              f"mean length {m['mean_length']:.0f}  ({m['problems']} problems)")


def cmd_r1(args) -> None:
    from .pipeline import R1Config, R1Pipeline

    cfg = R1Config.load(args.config, scale=args.scale, preset=args.preset, seed=args.seed, threads=args.threads,
                        precision=args.precision, compile_rollouts=COMPILE_CHOICES.get(args.compile),
                        defaults={**COMMAND_DEFAULTS, **ROLLOUT_DEFAULTS})
    report = R1Pipeline(cfg, args.out, progress=not args.no_progress).run(args.stages)
    print(f"done in {report['total_seconds'] / 60:.1f} min: {args.out}/report.md and report.json")
