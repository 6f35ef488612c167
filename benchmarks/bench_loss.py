"""The training loss through the output head: nanoseek's chunked cross-entropy vs the plain one.

plain = `F.cross_entropy(lm_head(h).float(), labels)` (what transformers' causal-LM loss computes), fused =
the chunked path of `nanoseek.train.loss.linear_cross_entropy`. Each row: forward + backward of the
loss alone (N tokens of width D, vocabulary V, every 7th label ignored), alternated in one process after
warm-up, under bf16 autocast (where training takes the fused path) and in fp32 (where it does not).
Also prints how far the two sides' loss and gradients are apart.

    python benchmarks/bench_loss.py                       # 2048 x 256 -> 8192 (bench_train.py's shape) and more
    python benchmarks/bench_loss.py --shapes 4096x256x32000 --steps 5
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.train.loss import _FusedLinearCrossEntropy
from common import alternate, load_report, machine_info, median, spread


def loss_step(h0, head, labels, fused: bool, bf16: bool):
    dtype = torch.bfloat16 if bf16 else torch.float32

    def step():
        h = h0.clone().requires_grad_()
        head.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:   # the chunked path itself, also in fp32 where linear_cross_entropy would not take it
                loss = _FusedLinearCrossEntropy.apply(h, head.weight, labels, dtype)
            else:
                loss = F.cross_entropy(head(h).float(), labels)
        loss.backward()
        return loss.detach(), h.grad, head.weight.grad.clone()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["2048x256x8192", "2048x256x524", "4096x256x32000"],
                    help="N x D x V (tokens, hidden, vocabulary)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    print(machine_info())
    print(load_report("start"))
    print(f"{'shape':>16s} {'dtype':>5s} {'plain ms':>9s} {'fused ms':>9s} {'plain/fused':>11s} "
          f"{'|dloss|':>8s} {'grad_h rel':>10s} {'grad_w rel':>10s}")
    for shape in args.shapes:
        N, D, V = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        head = nn.Linear(D, V, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.randn(V, D, generator=g) * D ** -0.5)
        h0 = torch.randn(N, D, generator=g)
        labels = torch.randint(0, V, (N,), generator=g)
        labels[::7] = -100
        for bf16 in (True, False):
            out = {}
            times = alternate({"plain": loss_step(h0, head, labels, False, bf16),
                               "fused": loss_step(h0, head, labels, True, bf16)}, args.steps, args.warmup,
                              lambda name, i, dt, o: out.__setitem__(name, o))
            p, f = out["plain"], out["fused"]
            rel = [((a - b).norm() / b.norm()).item() for a, b in zip(f[1:], p[1:])]
            tp, tf = median(times["plain"]), median(times["fused"])
            print(f"{shape:>16s} {'bf16' if bf16 else 'fp32':>5s} {tp * 1e3:9.1f} {tf * 1e3:9.1f} {tp / tf:10.2f}x "
                  f"{abs(f[0] - p[0]).item():8.1e} {rel[0]:10.1e} {rel[1]:10.1e}   "
                  f"(spread plain {spread(times['plain'])}, fused {spread(times['fused'])})")
    print(load_report("end"))


if __name__ == "__main__":
    main()
