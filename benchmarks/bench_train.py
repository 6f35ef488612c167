"""Training-step throughput: nanoseek vs HF transformers' DeepseekV3ForCausalLM, same weights and config.

One step = forward, cross-entropy, backward, AdamW step (fused, as nanoseek's trainers and transformers'
Trainer use it; --unfused-adamw: torch's default for-loop), zero_grad. Both models start from the same weights
(nanoseek `save_pretrained` -> HF `from_pretrained`), train on the same fixed batch (B x T input tokens,
targets shifted by one), with identical AdamW settings. Each side computes the loss as its own training code
does: nanoseek's rows call the trainer's `language_model_losses` (on CPU under bf16 a chunked cross-entropy
that never holds fp32 logits for the whole batch: nanoseek/train/loss.py; in fp32 the plain one) and, under
bf16, run the attention core in fp32 where the machine probe found that faster, as the trainers do
(nanoseek/machine.py); HF's rows upcast the logits to fp32 and call `F.cross_entropy`, which is what
transformers' ForCausalLMLoss does.

Rows, per precision (fp32, and bf16 autocast over fp32 weights):
  nanoseek             main-head loss only: the same work as HF (the main comparison)
  nanoseek+MTP         main loss + 0.3 * MTP loss (depth-1 module: one more block + the shared lm_head)
  HF <experts impl>    one row per HF experts implementation (default grouped_mm and eager); the ratio
                       is taken against the fastest HF row, so nanoseek is compared with HF's best on CPU.
                       (batched_mm gathers a weight copy per token-expert pair, ~3 GB per MoE layer here,
                       which makes a step far slower (benchmarks/README.md), so it is not a default row;
                       add it with --hf-experts grouped_mm,eager,batched_mm.)
  --compile adds "nanoseek compiled" and "HF <first impl> compiled": each side's forward + loss through
                       torch.compile (what `nanoseek train --compile` does), on its own copy of the weights; the
                       compile falls in the warm-up steps.
All rows run in one process, alternating every step (order flipped each round), after warm-up steps.

MFU = (model FLOPs/token x tokens/s) / measured matmul peak of the same dtype (bench_matmul_peak.py).
Model FLOPs/token = 6 * N_active + 12 * L * H * T * (d_qk + d_v) / 2, where N_active counts the matmul
weights one token touches in the main model: attention projections, dense MLP, shared experts, the
router, K/E of the routed experts and lm_head; not the embedding (a lookup) nor the norms. The attention
term is PaLM's (full T x T scores, fwd+bwd). The MTP row's MFU uses the same (main-model) FLOP count, so
it understates that row's work.

    python benchmarks/bench_train.py                         # small preset, 8 x 256, fp32 + bf16
    python benchmarks/bench_train.py --steps 10 --precision fp32
    python benchmarks/bench_train.py --profile               # + torch.profiler table of nanoseek steps
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from bench_matmul_peak import measure_peak
from common import (EXPERTS_IMPLS, alternate, build_pair, fmt_int, load_hf, load_report,
                    machine_info, median, spread, train_flops_per_token)
from nanoseek.machine import attention_core_dtype
from nanoseek.model.mla import set_core_dtype
from nanoseek.train import language_model_losses

MTP_WEIGHT = 0.3


def make_steps(pair, hf_models: dict, x: torch.Tensor, y: torch.Tensor, bf16: bool, lr: float,
               fused: bool = False, compiled=None):
    """name -> closure running one training step and returning the loss (float). `compiled`: (HF implementation
    name, a fresh HF model) to add the torch.compile'd rows of both sides."""
    ns = pair.ns.train()
    # nanoseek's trainers run the attention core in fp32 under bf16 where this CPU's probe found it faster
    set_core_dtype(ns, attention_core_dtype("bf16" if bf16 else "float32", "cpu"))
    ns_opt = torch.optim.AdamW(ns.parameters(), lr=lr, fused=fused or None)
    ns_mtp = copy.deepcopy(ns)  # own copy + optimizer, so each row's step-0 loss starts from the same weights
    mtp_opt = torch.optim.AdamW(ns_mtp.parameters(), lr=lr, fused=fused or None)
    V = pair.cfg.vocab_size

    def ce(logits, target):   # transformers' ForCausalLMLoss on pre-shifted targets
        return F.cross_entropy(logits.reshape(-1, V).float(), target.reshape(-1))

    def finish(loss, opt):
        with record_function("## backward"):
            loss.backward()
        with record_function("## optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    def ns_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), record_function("## forward"):
            loss = language_model_losses(ns, x, y, mtp=False)[0]
        return finish(loss, ns_opt)

    def ns_mtp_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), record_function("## forward"):
            loss, extra = language_model_losses(ns_mtp, x, y)   # depth k at position i predicts y[:, i+k]
            if extra:
                loss = loss + MTP_WEIGHT * sum(extra) / len(extra)
        return finish(loss, mtp_opt)

    steps = {"nanoseek": ns_step, "nanoseek+MTP": ns_mtp_step}
    if compiled is not None:
        ns_c = copy.deepcopy(ns)
        c_opt = torch.optim.AdamW(ns_c.parameters(), lr=lr, fused=fused or None)
        ns_c_loss = torch.compile(lambda: language_model_losses(ns_c, x, y, mtp=False)[0])

        def ns_compiled_step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), record_function("## forward"):
                loss = ns_c_loss()
            return finish(loss, c_opt)
        steps["nanoseek compiled"] = ns_compiled_step
    for impl, hf in hf_models.items():
        hf.train()
        opt = torch.optim.AdamW(hf.parameters(), lr=lr, fused=fused or None)

        def hf_step(hf=hf, opt=opt):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), record_function("## forward"):
                loss = ce(hf(input_ids=x, use_cache=False).logits, y)
            return finish(loss, opt)
        steps[f"HF {impl}"] = hf_step
    if compiled is not None:
        impl, hf_c = compiled
        hf_c.train()
        hf_c_opt = torch.optim.AdamW(hf_c.parameters(), lr=lr, fused=fused or None)
        hf_c_loss = torch.compile(lambda: ce(hf_c(input_ids=x, use_cache=False).logits, y))

        def hf_compiled_step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), record_function("## forward"):
                loss = hf_c_loss()
            return finish(loss, hf_c_opt)
        steps[f"HF {impl} compiled"] = hf_compiled_step
    return steps


def profile_steps(step, label: str, n: int, rows: int = 30) -> None:
    """torch.profiler over n steps; '## forward/backward/optimizer' rows give the phase split (CPU total)."""
    from torch.profiler import ProfilerActivity, profile
    step()  # warm
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(n):
            step()
    print(f"\n=== torch.profiler: {n} {label} training step(s), top {rows} ops by self CPU time ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))
    phases = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key.startswith("## ")}
    print("phase split (CPU total per step): " + ", ".join(f"{k[3:]} {v / n / 1e3:.0f} ms" for k, v in phases.items()))


def run_precision(args, precision: str, peak: float) -> list[dict]:
    bf16 = precision == "bf16"
    impls = [s for s in args.hf_experts.split(",") if s]
    pair = build_pair(args.preset, seed=args.seed, experts_implementation=impls[0])
    hf_models = {impls[0]: pair.hf}
    for impl in impls[1:]:  # one HF instance per implementation, each with its own optimizer
        hf_models[impl] = load_hf(pair.path, impl)  # asserts HF reports this implementation and sdpa

    g = torch.Generator().manual_seed(args.seed + 1)
    seq = torch.randint(0, pair.cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    compiled = (impls[0], load_hf(pair.path, impls[0])) if args.compile else None
    steps = make_steps(pair, hf_models, x, y, bf16, args.lr, args.fused_adamw, compiled)
    if args.no_mtp_row:
        steps.pop("nanoseek+MTP")

    first_loss = {}

    def on_result(name, i, dt, loss):
        first_loss.setdefault(name, loss)
        if args.verbose:
            print(f"  {precision} {name:18s} {'warm-up' if i < 0 else f'step {i}'}: {dt:.3f} s  loss {loss:.4f}")

    times = alternate(steps, args.steps, args.warmup, on_result)
    tokens = args.batch * args.seq_len
    flops_tok, _ = train_flops_per_token(pair.ns, args.seq_len)
    rows = []
    for name, ts in times.items():
        tps = tokens / median(ts)
        rows.append(dict(precision=precision, name=name, median_s=median(ts), spread=spread(ts), tps=tps,
                         mfu=flops_tok * tps / (peak * 1e9), loss0=first_loss[name]))
    hf_rows = [r for r in rows if r["name"].startswith("HF ")]
    best_hf = max(hf_rows, key=lambda r: r["tps"])
    for r in rows:
        r["vs_best_hf"] = r["tps"] / best_hf["tps"]
    print(f"\n--- {precision}{' (autocast bf16, fp32 master weights)' if bf16 else ''}: "
          f"{args.batch} x {args.seq_len} tokens/step, {args.warmup} warm-up + {args.steps} measured steps each, "
          f"matmul peak {peak:.1f} GFLOP/s ---")
    print(f"{'row':24s} {'median s/step':>13s} {'min/max vs median':>18s} {'tokens/s':>9s} {'MFU':>6s} "
          f"{'vs best HF':>10s} {'loss@step0':>10s}")
    for r in rows:
        print(f"{r['name']:24s} {r['median_s']:13.3f} {r['spread']:>18s} {r['tps']:9.0f} {100 * r['mfu']:5.1f}% "
              f"{r['vs_best_hf']:9.2f}x {r['loss0']:10.4f}")
    print(f"fastest HF row ({precision}): {best_hf['name'][3:]}; nanoseek/HF = {rows[0]['vs_best_hf']:.2f}x"
          + "".join(f"; {r['name']}/HF = {r['vs_best_hf']:.2f}x" for r in rows if r["name"] == "nanoseek compiled"))
    if args.profile:
        profile_steps(steps["nanoseek"], f"nanoseek {precision}", args.profile_steps)
        if args.profile_hf:
            profile_steps(steps[best_hf["name"]], f"{best_hf['name']} {precision}", args.profile_steps)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per row (median reported)")
    ap.add_argument("--warmup", type=int, default=6,
                    help="warm-up steps per row (bf16 on CPU builds a kernel per new GEMM shape in its first steps)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--hf-experts", default="grouped_mm,eager",
                    help=f"comma-separated HF experts implementations to run as rows ({', '.join(EXPERTS_IMPLS)})")
    ap.add_argument("--no-mtp-row", action="store_true", help="skip the nanoseek+MTP row")
    ap.add_argument("--compile", action="store_true",
                    help="add torch.compile'd rows for nanoseek and the first HF implementation (minutes to compile)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--unfused-adamw", dest="fused_adamw", action="store_false",
                    help="torch's default AdamW (the for-loop on CPU) for every row, instead of AdamW(fused=True), "
                         "which nanoseek's trainers and transformers' Trainer (optim adamw_torch_fused) use")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--peak-fp32", type=float, default=None, help="GFLOP/s; default: measure now")
    ap.add_argument("--peak-bf16", type=float, default=None, help="GFLOP/s; default: measure now")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one nanoseek step")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler (default 3)")
    ap.add_argument("--profile-hf", action="store_true", help="with --profile: also profile the fastest HF row")
    ap.add_argument("--verbose", action="store_true", help="print every step's time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(machine_info())
    print(load_report("start"))
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    peaks = {}
    for p in precisions:
        given = args.peak_fp32 if p == "fp32" else args.peak_bf16
        peaks[p] = given or measure_peak(torch.float32 if p == "fp32" else torch.bfloat16, 2048, reps=10,
                                         min_seconds=2.0)
        print(f"matmul peak {p}: {peaks[p]:.1f} GFLOP/s "
              f"({'given' if given else 'measured: 2048^3, best of >= 10 reps and >= 2 s'})")

    import nanoseek  # FLOP breakdown once, on a throwaway model of the preset
    ns0 = nanoseek.build_model(nanoseek.ModelConfig.preset(args.preset), seed=args.seed)
    flops_tok, parts = train_flops_per_token(ns0, args.seq_len)
    print(f"model FLOPs/token (training, T={args.seq_len}): {fmt_int(flops_tok)} = 6 x {fmt_int(parts['total'])} "
          f"active matmul params + {fmt_int(parts['attention_flops'])} attention "
          f"[params: " + ", ".join(f"{k} {fmt_int(v)}" for k, v in parts.items()
                                   if k not in ("total", "attention_flops")) + "]")
    del ns0

    all_rows = []
    for p in precisions:
        all_rows += run_precision(args, p, peaks[p])
    print("\n" + load_report("end"))
    print("\nsummary (tokens/s):")
    for p in precisions:
        rows = {r["name"]: r for r in all_rows if r["precision"] == p}
        hf = {n: r for n, r in rows.items() if n.startswith("HF ")}
        best = max(hf.values(), key=lambda r: r["tps"])
        print(f"  {p}: nanoseek {rows['nanoseek']['tps']:.0f} (MFU {100 * rows['nanoseek']['mfu']:.1f}%), "
              + (f"nanoseek+MTP {rows['nanoseek+MTP']['tps']:.0f}, " if "nanoseek+MTP" in rows else "")
              + (f"nanoseek compiled {rows['nanoseek compiled']['tps']:.0f}, " if "nanoseek compiled" in rows else "")
              + ", ".join(f"{n} {r['tps']:.0f}" for n, r in hf.items())
              + f"; nanoseek/{best['name']} = {rows['nanoseek']['vs_best_hf']:.2f}x")


if __name__ == "__main__":
    main()
