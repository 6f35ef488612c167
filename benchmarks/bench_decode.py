"""Greedy decoding throughput: nanoseek (`nanoseek.infer.greedy_generate`, latent cache, absorbed MLA)
vs HF transformers `DeepseekV3ForCausalLM.generate(do_sample=False)` (DynamicCache of full per-head K/V),
on the same weights.

For each precision (fp32; bf16 = both models cast to bfloat16) and batch size (default 1 and 16), each
row generates exactly `--new-tokens` tokens after a `--prompt-len` random prompt: nanoseek with
eos_token_id=None, HF with generation_config.eos_token_id=None and min_new_tokens=max_new_tokens, so no
row stops early (asserted). tokens/s = batch * new_tokens / wall time of the whole call, prefill included.
HF runs one row per experts implementation (default grouped_mm, eager, batched_mm); the ratio is taken
against the fastest HF row. All rows alternate in one process (order flipped each round) after warm-up.
Row "nanoseek compiled" is greedy_generate(compiled=True): the decode steps through torch.compile
(inductor, dynamic shapes); its one-off compile time is printed and kept out of the timed calls.

Correctness check: the greedy ids of nanoseek and every HF row are compared (fraction of equal generated
tokens and the first position where they differ); in fp32 they should agree exactly. bf16 is printed for
information (rounding differences may flip a near-tie argmax and the continuations then diverge).

    python benchmarks/bench_decode.py                          # bs 1 and 16, fp32 and bf16
    python benchmarks/bench_decode.py --batch-sizes 1 --precision fp32 --reps 5
"""

from __future__ import annotations

import argparse
import time

import torch

from common import (EXPERTS_IMPLS, alternate, build_pair, load_hf, load_report, machine_info, median,
                    spread)

from nanoseek.infer import greedy_generate


def agreement(a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> tuple[float, int | None]:
    """Fraction of equal generated tokens and the first generated position (0-based) where any row differs."""
    ga, gb = a[:, prompt_len:], b[:, prompt_len:]
    eq = ga == gb
    bad = (~eq).any(0).nonzero()
    return eq.float().mean().item(), (int(bad[0]) if len(bad) else None)


def run_config(args, pair, hf_models: dict, precision: str, batch: int) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(0, pair.cfg.vocab_size, (batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    n_new = args.new_tokens

    def ns_call(compiled=False):
        return greedy_generate(pair.ns, ids, n_new, eos_token_id=None, compiled=compiled)

    calls = {"nanoseek": ns_call}
    if args.compile:
        t0 = time.perf_counter()
        ns_call(compiled=True)   # compiles: not part of the timed calls
        print(f"nanoseek compiled ({precision}, bs{batch}): first call (torch.compile) {time.perf_counter() - t0:.1f} s")
        calls["nanoseek compiled"] = lambda: ns_call(compiled=True)
    for impl, hf in hf_models.items():
        @torch.no_grad()
        def hf_call(hf=hf):
            return hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                               min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
        calls[f"HF {impl}"] = hf_call

    outputs = {}

    def on_result(name, i, dt, out):
        assert out.shape == (batch, args.prompt_len + n_new), f"{name} returned {tuple(out.shape)}"
        outputs.setdefault(name, out)
        if args.verbose:
            print(f"  {precision} bs{batch} {name:14s} {'warm-up' if i < 0 else f'rep {i}'}: {dt:.3f} s")

    times = alternate(calls, args.reps, args.warmup, on_result)
    rows = []
    for name, ts in times.items():
        frac, first = agreement(outputs["nanoseek"], outputs[name], args.prompt_len)
        rows.append(dict(precision=precision, batch=batch, name=name, median_s=median(ts), spread=spread(ts),
                         tps=batch * n_new / median(ts), agree=frac, first_diff=first))
    best = max((r for r in rows if r["name"].startswith("HF ")), key=lambda r: r["tps"])
    for r in rows:
        r["vs_best_hf"] = r["tps"] / best["tps"]
    print(f"\n--- {precision}, batch {batch}: prompt {args.prompt_len} + {n_new} new tokens, "
          f"{args.warmup} warm-up + {args.reps} measured calls each ---")
    print(f"{'row':18s} {'median s':>9s} {'min/max vs median':>18s} {'tokens/s':>9s} {'vs best HF':>10s} "
          f"{'ids = nanoseek':>15s}")
    for r in rows:
        agree = "" if r["name"] == "nanoseek" else (
            f"{100 * r['agree']:.1f}%" + ("" if r["first_diff"] is None else f" (1st diff @{r['first_diff']})"))
        print(f"{r['name']:18s} {r['median_s']:9.3f} {r['spread']:>18s} {r['tps']:9.1f} {r['vs_best_hf']:9.2f}x "
              f"{agree:>15s}")
    print(f"fastest HF experts implementation ({precision}, bs{batch}): {best['name'][3:]}; "
          f"nanoseek/HF = {rows[0]['vs_best_hf']:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ns_call()
        print(f"\n=== torch.profiler: one nanoseek greedy_generate call ({precision}, bs{batch}), "
              f"top 25 ops by self CPU time ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="measured calls per row (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--hf-experts", default=",".join(("grouped_mm", "eager", "batched_mm")),
                    help=f"comma-separated HF experts implementations to run as rows ({', '.join(EXPERTS_IMPLS)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the 'nanoseek compiled' row (greedy_generate(compiled=True), torch.compile'd decode steps)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one nanoseek call")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(machine_info())
    print(load_report("start"))
    impls = [s for s in args.hf_experts.split(",") if s]
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    all_rows = []
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        pair = build_pair(args.preset, seed=args.seed, experts_implementation=impls[0], dtype=dtype)
        hf_models = {impls[0]: pair.hf}
        for impl in impls[1:]:
            hf_models[impl] = load_hf(pair.path, impl).to(dtype)
        pair.ns.eval()
        for hf in hf_models.values():
            hf.eval()
            hf.generation_config.eos_token_id = None  # never stop early: every row makes new_tokens tokens
        for batch in args.batch_sizes:
            all_rows += run_config(args, pair, hf_models, precision, batch)

    print("\n" + load_report("end"))
    print("\nsummary (generated tokens/s):")
    for precision in precisions:
        for batch in args.batch_sizes:
            rows = {r["name"]: r for r in all_rows if r["precision"] == precision and r["batch"] == batch}
            hf = {n: r for n, r in rows.items() if n.startswith("HF ")}
            best = max(hf.values(), key=lambda r: r["tps"])
            ids_ok = all(r["agree"] == 1.0 for n, r in rows.items() if n != "nanoseek")
            ours = [n for n in rows if not n.startswith("HF ")]
            print(f"  {precision} bs{batch:<3d}: " + ", ".join(f"{n} {rows[n]['tps']:.1f}" for n in ours) + ", "
                  + ", ".join(f"{n} {r['tps']:.1f}" for n, r in hf.items())
                  + "; " + ", ".join(f"{n}/{best['name']} = {rows[n]['vs_best_hf']:.2f}x" for n in ours) + "; greedy ids "
                  + ("identical" if ids_ok else "differ (see table)"))


if __name__ == "__main__":
    main()
