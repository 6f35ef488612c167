"""Pretraining ablations on the embedded default corpus, each arm the same token budget and seed:

  aux_free   MoE, auxiliary-loss-free bias balancing + sequence-wise loss (alpha 1e-4), MTP on  (V3 recipe)
  aux_loss   MoE, classic batch-wise auxiliary loss (alpha 1e-2), no bias updates, MTP on
  aux_free_g01  as aux_free with the bias update speed gamma = 1e-2 instead of 1e-3
  no_mtp     as aux_free with the MTP loss off (lambda = 0)
  dense      dense SwiGLU FFN with the same activated parameters per token, MTP on

Reports the final validation loss of the main head and the MaxVio (mean over MoE layers of the last
20 steps), writes docs/pretraining_ablations_table.md and docs/pretraining_ablations.png.

    python experiments/ablate_pretrain.py --steps 200 --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import os
import time


from nanoseek.train import TrainConfig, Trainer
from nanoseek.train.metrics import read_jsonl

ARMS = {
    "aux_free": dict(balance="aux_free"),
    "aux_loss": dict(balance="aux_loss"),
    "no_mtp": dict(balance="aux_free", mtp_lambda=0.0, mtp_lambda_late=0.0),
    # gamma 10x the V3 value: V3 ran ~10^5 steps at gamma 1e-3; 200 steps move a bias by 0.2 at most
    "aux_free_g01": dict(balance="aux_free", bias_gamma=1e-2),
    # 3 x 256 x 672 per layer ~= the MoE model's activated FFN (1 dense 768-wide layer + 3 x (4 routed + 1 shared) x 128)
    "dense": dict(balance="none", model={"n_routed_experts": 0, "intermediate_size": 672}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args()
    results = {}
    for arm in args.arms:
        out = os.path.join(args.out, arm)
        summary = os.path.join(out, "summary.json")
        if os.path.isfile(summary):  # resumable: finished arms are not rerun
            with open(summary) as f:
                results[arm] = json.load(f)
            continue
        overrides = dict(ARMS[arm])
        cfg = TrainConfig(max_steps=args.steps, val_every=50, val_batches=8, save_every=0, log_every=25,
                          **overrides)
        t0 = time.time()
        trainer = Trainer(cfg, out, progress=False)
        active = trainer.model.num_parameters(activated=True) - trainer.model.model.embed_tokens.weight.numel()
        trainer.fit()
        rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
        tail = rows[-20:]
        results[arm] = {
            "val_loss": rows[-1]["val_loss"],
            "train_lm_loss_last20": sum(r["lm_loss"] for r in tail) / len(tail),
            "max_vio_last20": (sum(r["max_vio"] for r in tail) / len(tail)) if "max_vio" in rows[-1] else None,
            "tokens": args.steps * cfg.batch_size * cfg.seq_len * cfg.grad_accum,
            "activated_non_embedding_params": active,
            "wall_s": time.time() - t0,
        }
        with open(summary, "w") as f:
            json.dump(results[arm], f, indent=1)
        print(arm, results[arm], flush=True)
    write_report(args, results)


def write_report(args, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in results:
        rows = read_jsonl(os.path.join(args.out, arm, "metrics.jsonl"))
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        ax1.plot(*zip(*val), "o-", label=arm)
        if "max_vio" in rows[-1]:
            ax2.plot([r["step"] for r in rows], [r["max_vio"] for r in rows], label=arm, lw=1)
    ax1.set(xlabel="step", ylabel="validation loss (main head)", title="validation loss")
    ax2.set(xlabel="step", ylabel="MaxVio (batch)", title="expert load imbalance", yscale="log")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    os.makedirs(args.docs, exist_ok=True)
    fig.savefig(os.path.join(args.docs, "pretraining_ablations.png"), dpi=110)
    lines = ["| arm | validation loss | train loss (last 20 steps) | MaxVio (last 20 steps) | activated params (non-embedding) | tokens | wall time |",
             "|---|---|---|---|---|---|---|"]
    for arm, r in results.items():
        vio = f"{r['max_vio_last20']:.3f}" if r["max_vio_last20"] is not None else "-"
        lines.append(f"| {arm} | {r['val_loss']:.4f} | {r['train_lm_loss_last20']:.4f} | {vio} | "
                     f"{r['activated_non_embedding_params']:,} | {r['tokens']:,} | {r['wall_s'] / 60:.1f} min |")
    with open(os.path.join(args.docs, "pretraining_ablations_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
