"""The R1 pipeline's report: report.json (the figures) and report.md (tables, curves, samples, timing).

report.json = {"stages": [{"name", "template", "seconds", "tasks": {task: {"pass@1", "maj@k",
"format", "mean_length", "problems"}}, ...}], "k": k, "total_seconds": s}: one entry per finished
stage, in pipeline order; stages without a model (rejection sampling) carry their statistics only.
"""

from __future__ import annotations

import json
import os
import statistics

from ..files import atomic_write_text
from ..train.metrics import read_jsonl

RL_STAGES = ("grpo", "rl2", "student_grpo")
SMOOTH = 5  # steps per point of the curves' moving average: one step's 8 prompts are a noisy sample


def write_report(out: str, records: list[dict]) -> dict:
    """Write report.json, report.md and rl_curves.png into `out`; returns the report dict."""
    k = next((r["k"] for r in records if "k" in r), None)
    report = {"stages": [{key: value for key, value in r.items() if key != "samples"} for r in records],
              "k": k, "total_seconds": sum(r.get("seconds", 0.0) for r in records)}
    write_json(os.path.join(out, "report.json"), report)
    curves = _plot_rl_curves(out)
    atomic_write_text(os.path.join(out, "report.md"), _markdown(records, report, curves))
    return report


def _markdown(records: list[dict], report: dict, curves: str | None) -> str:
    k = report["k"]
    evaluated = [r for r in records if r.get("tasks")]
    tasks = sorted({t for r in evaluated for t in r["tasks"]})
    lines = ["# nanoseek r1 report", "",
             f"Held-out accuracy of every stage's model (test split, {k} samples per problem at the R1 evaluation "
             f"settings): pass@1 = mean correctness of the samples, maj@{k} = correctness of the majority answer.", ""]
    if evaluated:
        lines += ["| stage | template | " + " | ".join(f"{t} pass@1 | {t} maj@{k}" for t in tasks)
                  + " | mean pass@1 | format | length |",
                  "|---|---|" + "---|---|" * len(tasks) + "---|---|---|"]
        for r in evaluated:
            cells = []
            for t in tasks:
                m = r["tasks"].get(t)
                cells += [f"{m['pass@1']:.3f}", f"{m['maj@k']:.3f}"] if m else ["", ""]
            ms = list(r["tasks"].values())
            mean = sum(m["pass@1"] for m in ms) / len(ms)
            fmt = sum(m["format"] for m in ms) / len(ms)
            length = sum(m["mean_length"] for m in ms) / len(ms)
            lines.append(f"| {r['name']} | {r['template']} | " + " | ".join(cells)
                         + f" | {mean:.3f} | {fmt:.2f} | {length:.0f} |")
        lines.append("")
    sampling = next((r.get("sampling") for r in records if r["name"] == "sample"), None)
    if sampling:
        lines += ["## Rejection sampling", "", "```", json.dumps(sampling, indent=1), "```", ""]
    if curves:
        lines += ["## RL curves", "", f"![reward and length]({os.path.basename(curves)})", ""]
    lines += ["## Time per stage", "", "| stage | seconds (total) | seconds (training) |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r.get('seconds', 0):.0f} | {r.get('train_seconds', 0):.0f} |" for r in records]
    lines += [f"| total | {report['total_seconds']:.0f} | |", ""]
    samples = [(r["name"], task, s) for r in evaluated for task, ss in r.get("samples", {}).items() for s in ss[:1]]
    if samples:
        lines += ["## Sample completions", ""]
        for name, task, s in samples:
            mark = "correct" if s["correct"] else "wrong"
            lines += [f"**{name} / {task}** ({mark}): {s['question']}", "", "```", s["completion"].strip(), "```", ""]
    return "\n".join(lines)


def _plot_rl_curves(out: str) -> str | None:
    """Reward and completion length per step of every RL stage that has metrics (None without matplotlib)."""
    runs = {s: read_jsonl(p) for s in RL_STAGES if os.path.isfile(p := os.path.join(out, s, "metrics.jsonl"))}
    runs = {s: rows for s, rows in runs.items() if rows}
    if not runs:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for color, (stage, rows) in zip(("C0", "C1", "C2"), runs.items()):
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("reward", "accuracy", "completion_len_mean")):
            values = [r.get(key, float("nan")) for r in rows]
            ax.plot(steps, values, color=color, alpha=0.25)
            ax.plot(steps, _moving_average(values, SMOOTH), color=color, label=stage)
            ax.set_title(f"{key} (faint: per step; solid: mean of {SMOOTH})")
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    path = os.path.join(out, "rl_curves.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON at `path` (its folder created), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1))
