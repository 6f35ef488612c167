"""DeepSeek Sparse Attention on CPU (docs/design/dsa.md): what attention costs as the context grows, dense MLA
against DSA, and what a short sparse stage costs in validation loss against the dense model.

1. Attention cost. One MLA layer of the `small` preset (4 heads, latent 64 + RoPE 16) with a lightning indexer
   of 4 heads x 32 and index_topk 256, against the same layer without it (dense MLA, nanoseek's V3 path), at
   contexts of 1K to 32K tokens, batch 1, fp32, no autograd, timed alternately (benchmarks/common.py):
   - prefill: the whole context from position 0 (dense: the naive path, SDPA's causal flash kernel; sparse: the
     indexer, then MQA over each query's 256 gathered latents); the indexer's share is timed on its own;
   - decode: one token at the end of a filled cache (dense: the absorbed path over every cached latent;
     sparse: the indexer over every cached key, then MQA over 256 latents).
   The peer is dense MLA: no CPU implementation of sparse attention exists to compare with (transformers'
   DeepseekV32 applies the selection as a mask over dense attention, which costs more than dense).
2. Loss gap, a CPU-sized version of V3.1 -> V3.2 on the embedded corpus (each stage continues the previous
   one's last checkpoint with `TrainConfig.init_from`, same seed and data order):
   base: dense pretraining at 256 tokens without YaRN -> ext: YaRN context extension to 512 tokens (factor 2)
   -> control: dense, N more steps | warm-up: an indexer (4 x 32, top-64 = 1/8 of the context) trained alone
   on its KL to dense attention -> sparse: the whole model with top-64 attention, N steps as the control.
   Reported: validation losses at 512 tokens (a sparse model is validated with sparse attention), the gap
   sparse - control, and the YaRN extension's effect (base at 512 tokens without / with YaRN, untrained).

Writes docs/dsa_attention_cost.png, docs/dsa_loss_gap.png and docs/dsa_bench.json.

    python benchmarks/bench_dsa.py --threads 1            # ~15-20 min on 2 shared cores
    python benchmarks/bench_dsa.py --quick                # a smoke run of both parts (~2 min)
    python benchmarks/bench_dsa.py --skip-train           # part 1 only; --skip-cost: part 2 only
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

import torch

from common import alternate, load_report, machine_info, median, spread

import nanoseek
from nanoseek import LatentCache, ModelConfig
from nanoseek.train import TrainConfig, Trainer
from nanoseek.train.metrics import read_jsonl
from nanoseek.train.trainer import language_model_losses

INDEXER = {"index_n_heads": 4, "index_head_dim": 32}


# ---- 1. attention cost ------------------------------------------------------------------------------------

def attention_layers(max_len: int, topk: int):
    """The same MLA layer (weights of layer 1 of a seeded `small` model) with and without an indexer."""
    cfg = ModelConfig.preset("small", max_position_embeddings=max_len, **INDEXER, index_topk=topk)
    sparse = nanoseek.build_model(cfg, seed=0).eval()
    dense = nanoseek.Transformer(cfg.replace(index_topk=None)).eval()
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if ".indexer." not in k})
    return cfg, sparse, dense


@torch.no_grad()
def attention_cost(lengths: list[int], topk: int, decode_reps: int) -> list[dict]:
    cfg, sparse_model, dense_model = attention_layers(max(lengths), topk)
    sparse, dense = sparse_model.model.layers[1].self_attn, dense_model.model.layers[1].self_attn
    rows = []
    for L in lengths:
        x = torch.randn(1, L, cfg.hidden_size)
        pos = torch.arange(L)[None]
        cos, sin = sparse_model.rotary(pos)
        q_in, _ = sparse._inputs(x, cos, sin)
        keys = sparse.indexer.keys(x, cos, sin)
        reps = 3 if L <= 8192 else 1
        prefill = alternate({"dense": lambda: dense(x, cos, sin, pos), "sparse": lambda: sparse(x, cos, sin, pos),
                             "indexer": lambda: sparse.indexer.select(x, q_in, cos, sin, keys, pos, pos)},
                            steps=reps, warmup=1 if L <= 8192 else 0)
        # decode: one token at position L-1 over a cache holding L tokens
        cache = LatentCache(cfg, 1, L, with_mtp=False)
        cache.latent.normal_()
        cache.index.normal_()
        x1, p1 = torch.randn(1, 1, cfg.hidden_size), torch.full((1, 1), L - 1)
        c1, s1 = sparse_model.rotary(p1)
        decode = alternate({"dense": lambda: dense(x1, c1, s1, p1, cache, absorb=True),
                            "sparse": lambda: sparse(x1, c1, s1, p1, cache, absorb=True)},
                           steps=decode_reps, warmup=2)
        row = {"tokens": L,
               "prefill_dense_s": median(prefill["dense"]), "prefill_sparse_s": median(prefill["sparse"]),
               "prefill_indexer_s": median(prefill["indexer"]),
               "decode_dense_ms": 1e3 * median(decode["dense"]), "decode_sparse_ms": 1e3 * median(decode["sparse"])}
        rows.append(row)
        print(f"{L:>6} | prefill dense {row['prefill_dense_s']:8.3f} s {spread(prefill['dense']):>12} sparse "
              f"{row['prefill_sparse_s']:8.3f} s {spread(prefill['sparse']):>12} (indexer {row['prefill_indexer_s']:7.3f}"
              f" s) x{row['prefill_dense_s'] / row['prefill_sparse_s']:5.2f} | decode dense "
              f"{row['decode_dense_ms']:7.3f} ms sparse {row['decode_sparse_ms']:7.3f} ms "
              f"x{row['decode_dense_ms'] / row['decode_sparse_ms']:5.2f}", flush=True)
    return rows


def plot_cost(rows: list[dict], topk: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L = [r["tokens"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.loglog(L, [r["prefill_dense_s"] for r in rows], "o-", label="dense MLA")
    a.loglog(L, [r["prefill_sparse_s"] for r in rows], "s-", label=f"DSA (top-{topk})")
    a.loglog(L, [r["prefill_indexer_s"] for r in rows], "^--", label="  of which the indexer")
    a.set(title="prefill of the whole context, one layer", xlabel="context (tokens)", ylabel="seconds")
    b.loglog(L, [r["decode_dense_ms"] for r in rows], "o-", label="dense MLA")
    b.loglog(L, [r["decode_sparse_ms"] for r in rows], "s-", label=f"DSA (top-{topk})")
    b.set(title="decode: one token after the context, one layer", xlabel="context (tokens)", ylabel="milliseconds")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- 2. loss gap ------------------------------------------------------------------------------------------

def run_stage(work: str, name: str, cfg: TrainConfig, before=None) -> tuple[str, float, list[dict], float | None]:
    """Train one stage; returns its last checkpoint, wall time, metrics rows and `before(trainer)` if given."""
    t0 = time.perf_counter()
    trainer = Trainer(cfg, os.path.join(work, name), progress=False)
    first = before(trainer) if before else None
    trainer.fit()
    ckpt = sorted(glob.glob(os.path.join(work, name, "checkpoints", "step-*")))[-1]
    seconds = time.perf_counter() - t0
    rows = read_jsonl(os.path.join(work, name, "metrics.jsonl"))
    print(f"  {name}: {cfg.max_steps} steps in {seconds:.0f} s, val {rows[-1].get('val_loss', float('nan')):.4f}",
          flush=True)
    return ckpt, seconds, rows, first


@torch.no_grad()
def val_loss(model, trainer: Trainer, batches: int) -> float:
    model.eval()
    losses = [language_model_losses(model, b.input_ids, b.labels, mtp=False)[0].item()
              for b in trainer.data.val_batches(trainer.cfg.batch_size, batches)]
    return sum(losses) / len(losses)


def loss_gap(work: str, a) -> dict:
    common = dict(preset="small", corpus_docs=a.corpus_docs, vocab_size=2048, seed=0, save_every=0,
                  log_every=max(1, a.steps // 4), val_batches=a.val_batches, peak_gflops=100.0, threads=a.threads,
                  warmup_steps=10, schedule="cosine")
    yarn = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": a.short, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    long = dict(seq_len=2 * a.short, batch_size=a.batch // 2)
    out: dict = {"topk": a.train_topk, "short": a.short, "long": 2 * a.short}
    print(f"loss gap: base {a.base_steps} steps at {a.short} tokens, extension {a.ext_steps}, then "
          f"control / warm-up {a.warmup_steps} + sparse, {a.steps} steps each, at {2 * a.short} tokens", flush=True)
    base, out["base_s"], _, _ = run_stage(work, "base", TrainConfig(
        **common, seq_len=a.short, batch_size=a.batch, max_steps=a.base_steps, lr=3e-3, val_every=a.base_steps,
        model={"num_hidden_layers": a.layers, "rope_scaling": None, "max_position_embeddings": a.short}))

    def before_ext(trainer):   # the base model at the long context: plain RoPE, then YaRN, both untrained
        b = nanoseek.from_pretrained(base)
        plain = nanoseek.Transformer(b.cfg.replace(max_position_embeddings=2 * a.short))
        plain.load_state_dict(b.state_dict())
        return {"base_long_plain_rope": val_loss(plain, trainer, a.val_batches),
                "base_long_yarn_untrained": val_loss(trainer.model, trainer, a.val_batches)}

    ext, out["ext_s"], ext_rows, out["yarn"] = run_stage(work, "ext", TrainConfig(
        **common, **long, max_steps=a.ext_steps, lr=1e-3, val_every=a.ext_steps, init_from=base,
        model={"rope_scaling": yarn, "max_position_embeddings": 2 * a.short}), before=before_ext)
    out["ext_val"] = ext_rows[-1]["val_loss"]
    stage = dict(**common, **long, max_steps=a.steps, lr=1e-3, val_every=max(1, a.steps // 4))
    _, out["control_s"], control_rows, _ = run_stage(work, "control", TrainConfig(**stage, init_from=ext))
    index = {**INDEXER, "index_topk": a.train_topk}
    warm, out["warmup_s"], warm_rows, out["sparse_random_indexer_val"] = run_stage(work, "warmup", TrainConfig(
        **{**stage, "max_steps": a.warmup_steps, "val_every": max(1, a.warmup_steps // 4), "lr": 3e-3},
        init_from=ext, model=index, dsa_stage="dense_warmup"), before=lambda t: t.validate())
    _, out["sparse_s"], sparse_rows, _ = run_stage(work, "sparse", TrainConfig(**stage, init_from=warm,
                                                                             dsa_stage="sparse"))
    out["control"] = [(r["step"], r["val_loss"]) for r in control_rows if "val_loss" in r]
    out["sparse"] = [(r["step"], r["val_loss"]) for r in sparse_rows if "val_loss" in r]
    out["warmup_kl"] = [(r["step"], r["indexer_kl"]) for r in warm_rows]
    out["warmup_val"] = [(r["step"], r["val_loss"]) for r in warm_rows if "val_loss" in r]
    out["sparse_kl"] = [(r["step"], r["indexer_kl"]) for r in sparse_rows]
    out["gap"] = out["sparse"][-1][1] - out["control"][-1][1]
    return out


def plot_gap(g: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("control", "o-"), ("sparse", "s-")):
        a.plot(*zip(*g[name]), style, label=f"{name} (top-{g['topk']} of {g['long']})" if name == "sparse" else
               "dense (control)")
    a.axhline(g["ext_val"], color="gray", ls=":", label="start: dense, after the YaRN extension")
    a.set(title=f"validation loss at {g['long']} tokens; gap {g['gap']:+.4f}", xlabel="step", ylabel="loss")
    b.plot(*zip(*g["warmup_kl"]), label="dense warm-up (indexer only)")
    b.plot([s + len(g["warmup_kl"]) for s, _ in g["sparse_kl"]], [k for _, k in g["sparse_kl"]],
           label="sparse stage (KL over the selected tokens)")
    b.set(title="indexer KL to the main attention", xlabel="step (warm-up, then sparse)", ylabel="KL (nats)",
          yscale="log")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--topk", type=int, default=256, help="index_topk of the attention-cost layer")
    p.add_argument("--decode-reps", type=int, default=15)
    p.add_argument("--short", type=int, default=256, help="pretraining context; the extension doubles it")
    p.add_argument("--train-topk", type=int, default=64, help="index_topk of the sparse stage")
    p.add_argument("--layers", type=int, default=2, help="num_hidden_layers of the trained model")
    p.add_argument("--batch", type=int, default=8, help="rows at the short context (half at the long one)")
    p.add_argument("--base-steps", type=int, default=160)
    p.add_argument("--ext-steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=60, help="steps of the control and of the sparse stage")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--corpus-docs", type=int, default=6000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="docs", help="folder for the PNGs and dsa_bench.json")
    p.add_argument("--work", default=None, help="folder for the training runs (default: a temporary one)")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--quick", action="store_true", help="a smoke run: short contexts, a few steps")
    a = p.parse_args()
    if a.quick:
        a.lengths, a.decode_reps, a.base_steps, a.ext_steps, a.warmup_steps, a.steps = [256, 512, 1024], 3, 6, 4, 4, 4
        a.short, a.train_topk, a.corpus_docs, a.val_batches = 64, 16, 600, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine_info())
    print(load_report("start"))
    result = {"machine": machine_info(), "args": vars(a)}
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    if not a.skip_cost:
        print(f"attention cost, one layer of `small` + indexer {INDEXER}, top-{a.topk}:")
        result["cost"] = attention_cost(a.lengths, a.topk, a.decode_reps)
        plot_cost(result["cost"], a.topk, os.path.join(a.out, "dsa_attention_cost.png"))
    if not a.skip_train:
        with tempfile.TemporaryDirectory() as tmp:
            g = result["gap"] = loss_gap(a.work or tmp, a)
        plot_gap(g, os.path.join(a.out, "dsa_loss_gap.png"))
        print(f"val at {g['long']} tokens: base plain RoPE {g['yarn']['base_long_plain_rope']:.4f}, base + YaRN "
              f"(untrained) {g['yarn']['base_long_yarn_untrained']:.4f}, after the extension {g['ext_val']:.4f}; "
              f"control {g['control'][-1][1]:.4f}; sparse with a random indexer {g['sparse_random_indexer_val']:.4f}, "
              f"after the warm-up {g['warmup_val'][-1][1]:.4f}, after the sparse stage {g['sparse'][-1][1]:.4f}: "
              f"gap {g['gap']:+.4f}")
    print(load_report("end"))
    print(f"total {time.perf_counter() - t0:.0f} s")
    with open(os.path.join(a.out, "dsa_bench.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
