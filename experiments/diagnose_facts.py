"""Held-out pass@1 next to how often the model's written arithmetic facts hold, per model.

For held-out problems (arithmetic and linear by default, difficulty 1) this samples k completions per
problem at the R1 evaluation settings (T 0.6, top-p 0.95) and reports per task pass@1, then over all
samples the share of the equations in the reasoning that hold (`nanoseek.rl.equations`) and the share
that also only use numbers from the question or earlier results ("grounded"). With --headroom it also
samples 8 completions at T 1.0 and reports pass@1 and pass@8 there (how often some sample is right).
docs/r1_report.md uses it to show what GRPO does to the facts.

    python experiments/diagnose_facts.py runs/r1/cold_start/model runs/r1/grpo/model
    python experiments/diagnose_facts.py runs/r1/student_pretrain/checkpoints/step-001000 --template r1_zero
"""

from __future__ import annotations

import argparse
import collections


from nanoseek.data.tokenizer import Tokenizer
from nanoseek.rl import EvalConfig, equations, final_answer, is_correct
from nanoseek.rl.data import question_of, task_examples, task_of
from nanoseek.rl.evaluate import sample_problems
from nanoseek.rl.rewards import think_text


def facts(model: str, problems: list, cfg: EvalConfig) -> dict:
    """pass@1 and pass@k per task, equation share and grounded share over all samples."""
    outs = sample_problems(model, Tokenizer.load(model), problems, cfg)
    correct, any_correct = collections.defaultdict(list), collections.defaultdict(list)
    plain, grounded = [], []
    for problem, out in zip(problems, outs):
        ok = [is_correct(problem, final_answer(c.text)) for c in out.outputs]
        correct[task_of(problem)] += ok
        any_correct[task_of(problem)].append(any(ok))
        for c in out.outputs:
            think = think_text(c.text) or ""
            plain += equations(think)
            grounded += equations(think, question_of(problem))
    share = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    return {"pass@1": {t: share(v) for t, v in correct.items()},
            f"pass@{cfg.k}": {t: share(v) for t, v in any_correct.items()},
            "equation share": share(plain), "grounded share": share(grounded), "equations": len(plain)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="checkpoint folders (with tokenizer.json)")
    p.add_argument("--tasks", nargs="+", default=["arithmetic", "linear"])
    p.add_argument("--n", type=int, default=100, help="held-out problems per task (default: 100)")
    p.add_argument("--k", type=int, default=4, help="samples per problem (default: 4)")
    p.add_argument("--template", choices=["chat", "r1_zero"], default="chat")
    p.add_argument("--headroom", action="store_true", help="also pass@1 / pass@8 at T 1.0, top-p 1.0")
    args = p.parse_args()
    problems = task_examples(args.tasks, "test", args.n, 1, 0)
    for model in args.models:
        r = facts(model, problems, EvalConfig(k=args.k, template=args.template))
        line = " ".join(f"{t} {v:.3f}" for t, v in sorted(r["pass@1"].items()))
        print(f"{model}: pass@1 {line} | equation share {r['equation share']:.3f}, grounded "
              f"{r['grounded share']:.3f} ({r['equations']} equations)", flush=True)
        if args.headroom:
            h = facts(model, problems, EvalConfig(k=8, temperature=1.0, top_p=1.0, template=args.template))
            print("  T 1.0: " + ", ".join(f"{t} pass@1 {h['pass@1'][t]:.3f} pass@8 {h['pass@8'][t]:.3f}"
                                          for t in sorted(h["pass@1"])), flush=True)


if __name__ == "__main__":
    main()
