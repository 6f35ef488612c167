"""GRPO step time: nanoseek's GRPOTrainer vs TRL's GRPOTrainer on the same model, side by side on CPU.

One seeded model (preset `small` by default, ~10M parameters, with a byte-level BPE tokenizer trained on
the embedded corpus) is saved once in HF format; nanoseek loads it with from_pretrained, TRL with
transformers' DeepseekV3ForCausalLM (sdpa attention, grouped_mm experts). Both get the same problems
(chat-template prompt strings of the built-in tasks), the same reward function (share of digit
characters, so groups have reward variance on a random policy), and the same settings: G completions
per prompt, prompts per step, max completion length, temperature 1.0, top_p 1.0, beta 0 (no reference
model), mu = 1, loss "dapo", group std scaling, one optimizer step per rollout over all completions
(TRL: per_device_train_batch_size = prompts x G, no gradient accumulation), fp32 (`--precision bf16`: bf16
autocast for the update on both sides; rollouts stay fp32 in nanoseek), no gradient checkpointing, no vLLM. nanoseek's zero-variance filtering is off (TRL has none), so both train on
every completion.

A step is rollout + rewards + advantages + forward/backward + optimizer step: nanoseek's
`GRPOTrainer.train_step()`, TRL's on_step_begin -> on_step_end (its generation happens inside the step).
Side "nanoseek compiled" is the same trainer with `compile_rollouts=True` (the rollout decode steps through
torch.compile); its compile falls in its warm-up step, which is printed and not timed (`--no-compile` skips it).
Each side runs `--rounds` times in alternating order (A B C, C B A, ...), each run 1 warm-up step + `--steps`
measured steps; the table gives the median seconds/step, generated tokens/step, and the ratio to TRL.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_grpo.py                 # small, G 8, 4 prompts, 64 tokens
    python benchmarks/bench_grpo.py --preset tiny --steps 3 --rounds 1      # a quick smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from common import load_report, machine_info, median, quiet_transformers, spread

import nanoseek
from nanoseek.data import default_corpus, train_tokenizer
from nanoseek.machine import resolve_precision
from nanoseek.rl.data import prompt_text, task_examples


def digit_share(completions, examples=None, **_) -> list[float]:
    """The shared reward: share of digit characters in the completion text (0 for an empty one)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def build_model_dir(preset: str, vocab: int, seed: int) -> str:
    path = tempfile.mkdtemp(prefix=f"nanoseek-bench-grpo-{preset}-")
    tok = train_tokenizer(default_corpus(2000), vocab_size=vocab)
    cfg = nanoseek.ModelConfig.preset(preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    nanoseek.save_pretrained(nanoseek.build_model(cfg, seed=seed), path)
    tok.save(path)
    return path


def run_nanoseek(args, path: str, out: str, compile_rollouts: bool = False) -> tuple[list[float], list[float]]:
    from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer
    cfg = GRPOConfig(tasks=["arithmetic", "countdown", "linear"], n_train_problems=50, steps=1 + args.steps,
                     prompts_per_step=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                     temperature=1.0, top_p=1.0, lr=args.lr, beta=0.0, mu=1, loss_type="dapo", scale_rewards="group",
                     filter_zero_variance=False, micro_batch=args.prompts * args.group_size, save_every=0,
                     tensorboard=False, seed=args.seed, rewards={"digits": 1.0}, device="cpu",
                     precision=args.precision, compile_rollouts=compile_rollouts)
    tr = GRPOTrainer(cfg, path, out, progress=False, reward_fns={"digits": digit_share})
    times, tokens = [], []
    for i in range(cfg.steps):
        t0 = time.perf_counter()
        row = tr.train_step()
        dt = time.perf_counter() - t0
        if i == 0 and compile_rollouts:
            print(f"  (nanoseek compiled: warm-up step incl. compiling {dt:.1f} s)")
        if i >= 1:
            times.append(dt)
            tokens.append(row["completion_len_mean"] * args.prompts * args.group_size)
    return times, tokens


def run_trl(args, path: str, out: str) -> tuple[list[float], list[float]]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(path)
    problems = task_examples(["arithmetic", "countdown", "linear"], "train", 50, seed=args.seed)
    ns_tok = nanoseek.data.tokenizer.Tokenizer.load(path)
    ds = datasets.Dataset.from_dict({"prompt": [prompt_text(p, ns_tok, "chat") for p in problems]})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                 experts_implementation="grouped_mm")
    batch = args.prompts * args.group_size
    cfg = GRPOConfig(output_dir=out, use_cpu=True, bf16=args.precision == "bf16", fp16=False,
                     per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, num_generations=args.group_size,
                     max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, learning_rate=args.lr,
                     lr_scheduler_type="constant", warmup_steps=0, beta=0.0, num_iterations=1, loss_type="dapo",
                     scale_rewards="group", gradient_checkpointing=False, max_steps=1 + args.steps, logging_steps=1,
                     save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed, use_vllm=False,
                     dataloader_num_workers=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.times, self.tokens = 0.0, [], []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                self.tokens.append(logs["completions/mean_length"] * batch)

    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[digit_share], args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would bury the table
    trainer.train()
    return timer.times[1:], timer.tokens[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="nanoseek model preset (default: small, ~10M parameters)")
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary (default: 2048)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (default: 4; x G completions)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=4, help="measured steps per run (after 1 warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="runs per side, alternating the order")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["float32", "bf16", "auto"], default="float32",
                   help="the update's precision on both sides: bf16 = nanoseek's precision='bf16' and TRL's bf16=True "
                        "(autocast); auto = what `nanoseek info --machine` picks here (default: float32)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the 'nanoseek compiled' side (rollouts through torch.compile, compiled in its "
                        "warm-up step)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "auto":
        args.precision = resolve_precision("auto", "cpu")
    quiet_transformers()
    import trl
    print(machine_info() + f", trl {trl.__version__}")
    print(load_report("start"))
    path = build_model_dir(args.preset, args.vocab, args.seed)
    work = tempfile.mkdtemp(prefix="nanoseek-bench-grpo-runs-")
    try:
        params = nanoseek.from_pretrained(path).num_parameters()
        print(f"model: preset {args.preset!r}, {params:,} parameters, vocab {args.vocab}; G {args.group_size}, "
              f"{args.prompts} prompts/step ({args.prompts * args.group_size} completions), max "
              f"{args.max_new_tokens} new tokens, T 1.0, beta 0, mu 1, loss dapo, CPU, update in {args.precision}")
        sides = {"nanoseek": run_nanoseek, "TRL": run_trl}
        if args.compile:
            sides["nanoseek compiled"] = lambda *a: run_nanoseek(*a, compile_rollouts=True)
        times = {n: [] for n in sides}
        tokens = {n: [] for n in sides}
        for r in range(args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                t, k = sides[name](args, path, os.path.join(work, f"{name.replace(' ', '-')}-{r}"))
                times[name] += t
                tokens[name] += k
                print(f"  round {r} {name:17s}: " + ", ".join(f"{x:.2f}" for x in t) + " s/step")
        print(f"\n{'':17s} {'median s/step':>14s} {'min/max vs median':>18s} {'gen tokens/step':>16s} {'vs TRL':>7s}")
        for name in sides:
            tok = f"{median(tokens[name]):.0f}" if tokens[name] else "n/a"
            ratio = median(times["TRL"]) / median(times[name])
            print(f"{name:17s} {median(times[name]):14.3f} {spread(times[name]):>18s} {tok:>16s} {ratio:6.2f}x")
        print(load_report("end"))
    finally:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
