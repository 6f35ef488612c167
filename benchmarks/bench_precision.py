"""Training precisions side by side on the embedded default: fp32, bf16 and FP8 (DeepSeek-V3's validation of its
FP8 recipe, at toy scale; and whether `--precision auto` choosing bf16 costs any quality).

Trains the same model once per precision with `nanoseek train`'s Trainer, same seed, same data order and tokens:
  float32  fp32 everywhere
  bf16     autocast over fp32 master weights (the routed experts follow it)
  fp8      the FP8 recipe (nanoseek/fp8: 1x128 tiles, 128x128 blocks, E4M3, fp32 accumulation) for the
           projections and routed experts, the rest under the same bf16 autocast
and reports the relative gaps of the training loss, averaged over the last --window steps (single steps are
noisy), and of the final validation loss: fp8 against bf16 (the V3 report's bar: below 0.25%) and bf16 against
float32. Throughput is the median step's tokens/s.

Activation memory: the bytes autograd keeps for the backward of one micro-batch (saved tensors, counted once per
storage, parameters excluded), measured with torch.autograd.graph.saved_tensors_hooks on the first batch.

    python benchmarks/bench_precision.py                 # small preset, 200 steps; plot docs/precision_loss.png
    python benchmarks/bench_precision.py --precisions bf16,fp8 --steps 40 --preset tiny --plot ''  # a quick look

`--r1` compares instead the pretraining stage of `nanoseek r1` (1400 steps of 4 x 512 tokens on its task corpus,
about 16 minutes per run on 2 CPU cores) to its end, with the base model's held-out pass@1 that the R1 report
starts from: float32 and bf16, each at the training seeds of --r1-seeds (default 0 and 1; another initialisation
and data order: the spread that is not precision's). Runs already finished in --out are reused.

    python benchmarks/bench_precision.py --r1 --out runs/precision_r1       # plot docs/precision_r1_pretrain.png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from common import machine_info
from nanoseek.train import TrainConfig, Trainer


def activation_bytes(trainer: Trainer) -> int:
    """Bytes saved for the backward of the loss of one micro-batch (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    batch = next(iter(trainer.data.val_batches(trainer.cfg.batch_size, 1)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = trainer._loss(batch, lam=trainer.cfg.mtp_lambda)
    del loss
    return sum(kept.values())


def train(precision: str, args, out: str) -> dict:
    cfg = TrainConfig(preset=args.preset, precision=precision, max_steps=args.steps, seed=args.seed,
                      threads=args.threads, log_every=1, save_every=0, val_every=args.steps,
                      warmup_steps=min(20, args.steps // 10))
    trainer = Trainer(cfg, os.path.join(out, precision), progress=False)
    act = activation_bytes(trainer)
    trainer.fit()
    with open(os.path.join(out, precision, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"lm_loss": [r["lm_loss"] for r in rows if "lm_loss" in r],
            "val_loss": [r["val_loss"] for r in rows if "val_loss" in r][-1], "activation_bytes": act,
            "tokens_per_s": sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]}


def r1_pretrain(precision: str, seed: int, args, out: str) -> dict:
    """The R1 pipeline's pretrain stage at this precision and training seed (resumed if already done)."""
    from nanoseek.rl.pipeline import R1Config, R1Pipeline

    folder = os.path.join(out, f"{precision}_seed{seed}")
    cfg = R1Config(precision=precision, threads=args.threads, pretrain={**R1Config().pretrain, "seed": seed})
    report = R1Pipeline(cfg, folder, progress=False, log=lambda *_: None).run(["pretrain"])
    stage = report["stages"][0]
    with open(os.path.join(folder, "pretrain", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    tasks = stage["tasks"]
    return {"lm_loss": [r["lm_loss"] for r in rows if "lm_loss" in r], "val_loss": stage["val_loss"],
            "pass@1": sum(t["pass@1"] for t in tasks.values()) / len(tasks), "seconds": stage["train_seconds"],
            "tokens_per_s": sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]}


def main_r1(args) -> None:
    out = args.out or tempfile.mkdtemp(prefix="bench_precision_r1_")
    seeds = args.r1_seeds
    runs = {f"{p} seed {s}": r1_pretrain(p, s, args, out) for s in seeds for p in ("float32", "bf16")}
    tail = {k: sum(r["lm_loss"][-args.window:]) / args.window for k, r in runs.items()}
    print(f"\nnanoseek r1's pretraining stage, {torch.get_num_threads()} threads; runs in {out}")
    print(f"{'':16} {'loss (last ' + str(args.window) + ')':>18} {'val loss':>10} {'base pass@1':>12} {'tok/s':>8}")
    for k, r in runs.items():
        print(f"{k:16} {tail[k]:18.4f} {r['val_loss']:10.4f} {r['pass@1']:12.3f} {r['tokens_per_s']:8.0f}")
    base = f"float32 seed {seeds[0]}"
    for k in runs:
        if k != base:
            print(f"{k} vs {base}: training loss {100 * (tail[k] - tail[base]) / tail[base]:+.2f}%, val loss "
                  f"{100 * (runs[k]['val_loss'] - runs[base]['val_loss']) / runs[base]['val_loss']:+.2f}%, "
                  f"base pass@1 {runs[k]['pass@1'] - runs[base]['pass@1']:+.3f}")
    if args.plot:
        pairs = [(k, base) for k in runs if k != base]
        plot(runs, pairs, args.window, "nanoseek r1's pretraining stage (small preset, 1400 x 4 x 512 tokens)",
             args.plot)
        print(f"plot: {args.plot}")


def smooth(xs: list[float], window: int) -> list[float]:
    return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


def plot(runs: dict, pairs: list[tuple[str, str]], window: int, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    colors = {}
    for name, run in runs.items():
        colors[name] = ax.plot(smooth(run["lm_loss"], window), label=name)[0].get_color()
    ax.set_ylabel(f"training loss ({window}-step mean)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    for a, b in pairs:
        ya, yb = smooth(runs[a]["lm_loss"], window), smooth(runs[b]["lm_loss"], window)
        gap.plot([100 * (y - x) / x for x, y in zip(yb, ya)], label=f"{a} vs {b}", color=colors[a])
    for bar in (0.25, -0.25):
        gap.axhline(bar, ls="--", c="gray", lw=0.8)
    gap.set_ylabel("relative gap (%)")
    gap.set_xlabel("step")
    gap.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--precisions", default="float32,bf16,fp8")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (200: `nanoseek train`'s default)")
    p.add_argument("--window", type=int, default=50, help="steps averaged for the final training-loss gap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--plot", default=None, help="'' for none (default: docs/precision_loss.png, with --r1 "
                   "docs/precision_r1_pretrain.png)")
    p.add_argument("--r1", action="store_true", help="nanoseek r1's pretraining stage instead (see above)")
    p.add_argument("--r1-seeds", type=seed_list, default=[0, 1],
                   help="with --r1: the pretraining's training seeds, comma-separated (default: 0,1)")
    args = p.parse_args()
    print(machine_info())
    if args.r1:
        args.plot = "docs/precision_r1_pretrain.png" if args.plot is None else args.plot
        args.window = max(args.window, 100)
        return main_r1(args)
    args.plot = "docs/precision_loss.png" if args.plot is None else args.plot
    out = args.out or tempfile.mkdtemp(prefix="bench_precision_")
    runs = {precision: train(precision, args, out) for precision in args.precisions.split(",")}
    tail = {k: sum(r["lm_loss"][-args.window:]) / len(r["lm_loss"][-args.window:]) for k, r in runs.items()}
    print(f"\n{args.preset} preset, {args.steps} steps, seed {args.seed}, {torch.get_num_threads()} threads")
    print(f"{'':8} {'loss (last ' + str(args.window) + ')':>18} {'val loss':>10} {'activations':>12} {'tok/s':>8}")
    for k, r in runs.items():
        print(f"{k:8} {tail[k]:18.4f} {r['val_loss']:10.4f} {r['activation_bytes'] / 2**20:9.1f} MB "
              f"{r['tokens_per_s']:8.0f}")
    pairs = [(a, b) for a, b in (("fp8", "bf16"), ("bf16", "float32")) if a in runs and b in runs]
    for a, b in pairs:
        ra, rb = runs[a], runs[b]
        print(f"{a} vs {b}: training loss {100 * (tail[a] - tail[b]) / tail[b]:+.3f}%, val loss "
              f"{100 * (ra['val_loss'] - rb['val_loss']) / rb['val_loss']:+.3f}%, activation memory "
              f"{ra['activation_bytes'] / rb['activation_bytes']:.2f}x, "
              f"tokens/s {ra['tokens_per_s'] / rb['tokens_per_s']:.2f}x")
    if args.plot:
        plot(runs, pairs, args.window, f"{args.preset} preset, embedded default, seed {args.seed}", args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
