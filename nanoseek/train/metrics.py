"""Training observability: metrics.jsonl (one object per step), TensorBoard scalars, expert-load history,
and the PNG plots written at the end (loss curves, MaxVio, an expert-load heatmap per MoE layer)."""

from __future__ import annotations

import json
import math
import os


class MetricsLog:
    """Appends rows to `metrics.jsonl` and `expert_load.jsonl`; on resume drops rows past the resumed step."""

    def __init__(self, out_dir: str, resume_step: int | None = None, tensorboard: bool = True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.load_path = os.path.join(out_dir, "expert_load.jsonl")
        for path in (self.path, self.load_path):
            if resume_step is None:
                open(path, "w").close()
            else:
                _truncate_after(path, resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional for library users
                self.tb = None

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, row["step"])

    def log_expert_load(self, step: int, loads: dict[str, list[float]]) -> None:
        with open(self.load_path, "a") as f:
            f.write(json.dumps({"step": step, "load": loads}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _truncate_after(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_plots(out_dir: str) -> list[str]:
    """loss.png (train/val/MTP loss, MaxVio) and expert_load.png (per-layer heatmaps); returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    written = []
    if rows:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        steps = [r["step"] for r in rows]
        ax1.plot(steps, [r["lm_loss"] for r in rows], label="train (main head)", lw=1)
        if any("mtp_loss" in r for r in rows):
            ax1.plot(steps, [r.get("mtp_loss", float("nan")) for r in rows], label="train (MTP depth 1)", lw=1)
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            ax1.plot(*zip(*val), "o-", label="validation")
        ax1.set(xlabel="step", ylabel="cross-entropy", title="loss")
        ax1.legend()
        if any("max_vio" in r for r in rows):
            ax2.plot(steps, [r.get("max_vio", float("nan")) for r in rows], lw=1)
        ax2.set(xlabel="step", ylabel="MaxVio (batch, mean over layers)", title="expert load imbalance")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "loss.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    loads = read_jsonl(os.path.join(out_dir, "expert_load.jsonl"))
    if loads and loads[0]["load"]:  # a dense model has no MoE layers to draw
        layers = list(loads[0]["load"])
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            grid = [[row["load"][layer][e] for row in loads] for e in range(len(loads[0]["load"][layer]))]
            im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower",
                           extent=(loads[0]["step"], max(loads[-1]["step"], loads[0]["step"] + 1), -0.5,
                                   len(grid) - 0.5))
            ax.set(xlabel="step", ylabel="expert", title=layer.replace(".mlp", "").replace("model.", ""))
            fig.colorbar(im, ax=ax, label="share of routed tokens")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "expert_load.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
