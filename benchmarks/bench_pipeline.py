"""Pipeline schedules on CPU processes: step time and bubble of 1F1B, Interleaved1F1B, ZBVZeroBubble and
DualPipeV at equal micro-batches, next to the DualPipe paper's bubble formulas.

Each of `--ranks` processes (gloo, one thread each) holds its stages of the `small` preset deepened to `--layers`
layers (nanoseek/dist/pipeline.py; the same split the trainer uses) and runs `--steps` training steps of
`--microbatches` micro-batches of `--rows` x `--seq` tokens. On every rank the forward F and backward B of each
of its stages are timed alone on one micro-batch first; the rank's compute per step is M x sum(F + B), and

    measured bubble = 1 - compute per step / step time     (the slowest rank's)

The paper's formulas (DualPipe, DeepSeek-V3 report Table 2; PP stages, F forward, B full backward, W its weight
part, F&B an overlapped forward+backward pair): 1F1B (PP-1)(F+B); ZB1P (PP-1)(F+B-2W); DualPipe(V)
(PP/2-1)(F&B+B-3W). Here they are evaluated with the measured per-stage F and B, W = B/2 and F&B = F+B (CPU
processes overlap nothing), as a fraction of the step.

    python benchmarks/bench_pipeline.py --ranks 2 --microbatches 8
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from common import machine_info

SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")


def _stage_costs(stages, rows: int, seq: int, hidden: int, vocab: int) -> tuple[float, float]:
    """(F, B): seconds of the forward and the backward of this rank's stages on one micro-batch, each stage timed
    alone (medians of 5 after a warm-up)."""
    f_total = b_total = 0.0
    for _, stage in stages:
        x = torch.randint(0, vocab, (rows, seq)) if stage.first else torch.randn(rows, seq, hidden, requires_grad=True)
        args = (x,) if stage.first else (x, torch.randn(rows, seq, hidden, requires_grad=True))
        fs, bs = [], []
        for _ in range(6):
            t0 = time.perf_counter()
            out = stage(*args)
            out = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
            t1 = time.perf_counter()
            torch.autograd.backward(out, [torch.randn_like(o) for o in out])
            fs.append(t1 - t0)
            bs.append(time.perf_counter() - t1)
            stage.zero_grad(set_to_none=True)
        f_total += statistics.median(fs[1:])
        b_total += statistics.median(bs[1:])
    return f_total, b_total


def _worker(rank: int, world: int, port: int, args, schedule: str, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import nanoseek
    from nanoseek.dist import ParallelDims
    from nanoseek.dist.pipeline import build_schedule, build_stages
    try:
        cfg = nanoseek.ModelConfig.preset("small", num_hidden_layers=args.layers, num_nextn_predict_layers=0)
        model = nanoseek.build_model(cfg, seed=0).train()
        dims = ParallelDims(world, pp=world, pp_schedule=schedule)
        stages = build_stages(model, dims, rank)
        cost = _stage_costs(stages, args.rows, args.seq, cfg.hidden_size, cfg.vocab_size)

        def loss_fn(outputs, labels):
            logits = outputs[0] if isinstance(outputs, tuple) else outputs
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

        sched = build_schedule(stages, dims, args.microbatches, args.rows, args.seq, loss_fn, torch.device("cpu"),
                               dist.group.WORLD)
        n = args.rows * args.microbatches
        ids = torch.randint(0, cfg.vocab_size, (n, args.seq), generator=torch.Generator().manual_seed(0))
        holds = {s for s, _ in stages}
        last = dims.pp * dims.stages_per_rank - 1
        times = []
        for step in range(args.steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            kwargs = {"target": ids, "losses": []} if last in holds else {}
            sched.step(*((ids,) if 0 in holds else ()), **kwargs)
            dist.barrier()
            if step:
                times.append(time.perf_counter() - t0)
            for _, stage in stages:
                stage.zero_grad(set_to_none=True)
        results[(schedule, rank)] = (statistics.median(times), cost, len(stages))
    finally:
        dist.destroy_process_group()


def formula_bubble(schedule: str, ranks: int, n_stages: int, f: float, b: float) -> float:
    """The bubble (seconds) of the DualPipe paper's table, with W = B/2 and F&B = F + B; f and b of one stage.
    Interleaved 1F1B: (ranks - 1)(F + B) / chunks, i.e. (ranks - 1)(f + b) with a chunk's f and b."""
    w = b / 2
    if schedule == "1F1B":
        return (n_stages - 1) * (f + b)
    if schedule == "Interleaved1F1B":
        return (ranks - 1) * (f + b)
    if schedule == "ZBVZeroBubble":
        return (n_stages - 1) * (f + b - 2 * w)
    return (n_stages / 2 - 1) * ((f + b) + b - 3 * w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--schedules", nargs="*", default=list(SCHEDULES))
    args = p.parse_args()
    print(machine_info())
    print(f"{args.ranks} ranks x 1 thread, small preset with {args.layers} layers, {args.microbatches} micro-batches "
          f"of {args.rows} x {args.seq} tokens\n")
    print(f"{'schedule':16s} {'stages':>6s} {'step s':>8s} {'compute s':>9s} {'bubble':>7s} {'paper bubble':>12s}")
    with mp.Manager() as manager:
        results = manager.dict()
        for schedule in args.schedules:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_worker, args=(args.ranks, port, args, schedule, results), nprocs=args.ranks,
                               start_method="spawn")
            ranks = [results[(schedule, r)] for r in range(args.ranks)]
            step = max(r[0] for r in ranks)
            compute = max(args.microbatches * sum(r[1]) for r in ranks)
            n_stages = args.ranks * ranks[0][2]
            f = max(r[1][0] for r in ranks) / ranks[0][2]               # one stage, one micro-batch
            b = max(r[1][1] for r in ranks) / ranks[0][2]
            bubble = formula_bubble(schedule, args.ranks, n_stages, f, b)
            paper = bubble / (compute + bubble)
            print(f"{schedule:16s} {n_stages:6d} {step:8.3f} {compute:9.3f} {1 - compute / step:7.1%} {paper:12.1%}")


if __name__ == "__main__":
    main()
