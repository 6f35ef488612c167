"""The `nanoseek` command line: one entry point, one sub-command per stage.

Pretraining (`train`, `tokenizer`), the R1 post-training stages (`sft`, `grpo`, `sample`, `distill`, `eval`, `r1`),
inference (`generate`, `chat`, `serve`) and `info`, `demo`.

Errors. argparse answers what it can see (an unknown flag, a value of the wrong type or outside `choices`);
every other user error (a flag's range, a bad file, a checkpoint that does not load, an invalid config field)
is a one-line "nanoseek CMD: error: ..." on stderr naming the flag, field, file or tensor, and exit code 2.
Checks of flag ranges run before anything slow (loading a model, reading data).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import ConfigError, ModelConfig, PRESETS
from .dist.mesh import PP_SCHEDULES
from .machine import COMMAND_DEFAULTS, PRECISIONS, decode_profile, machine_profile
from .runtime import is_main_process
from .model import build_model


def require_flags(args, **minimums: int) -> None:
    """ValueError naming the first flag below its minimum: require_flags(args, batch=1) with --batch 0 raises
    "--batch must be >= 1 (got 0)". Flags left unset (None) or absent from `args` pass."""
    for dest, minimum in minimums.items():
        value = getattr(args, dest, None)
        if value is not None and value < minimum:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= {minimum} (got {value})")


def require_folder(path: str | None, flag: str) -> None:
    """ValueError when `path` names an existing file where a folder (new or existing) is wanted."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is an existing file; it must be a folder (new, or one written before)")


def _load(args) -> tuple[ModelConfig, torch.nn.Module | None]:
    if args.model:
        model = from_pretrained(args.model, allow_non_finite=args.allow_non_finite)
        return model.cfg, model
    return ModelConfig.preset(args.preset), None


def cmd_info(args) -> None:
    """Print a config's shape, parameter counts and KV-cache bytes per token (or, --machine, the probes)."""
    if args.machine:
        print(machine_profile(remeasure=args.remeasure).describe())
        if args.decode:
            print(decode_profile(remeasure=args.remeasure).describe())
        return
    cfg, model = _load(args)
    if model is None:
        model = build_model(cfg, device="meta")
    total, active = model.num_parameters(), model.num_parameters(activated=True)
    mtp = sum(t.numel() for n, t in model.state_dict().items() if n.startswith("mtp."))
    print(f"model_type {cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, {cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}), "
          f"{cfg.n_shared_experts} shared, MTP depth {cfg.num_nextn_predict_layers}")
    print(f"parameters: {total:,} total, {active:,} activated per token, {mtp:,} in MTP modules")
    mla, mha = cfg.kv_cache_bytes_per_token(2), cfg.mha_cache_bytes_per_token(2)
    print(f"KV cache per token (bf16): MLA latent {mla:,} B = (kv_lora_rank {cfg.kv_lora_rank} + "
          f"qk_rope_head_dim {cfg.qk_rope_head_dim}) x {cfg.num_hidden_layers} layers x 2 B; "
          f"an MHA cache would take {mha:,} B ({mha / mla:.1f}x)")
    if cfg.has_indexer:
        index = cfg.index_cache_bytes_per_token(2)
        print(f"DSA: lightning indexer {cfg.index_n_heads} heads x {cfg.index_head_dim}, top-{cfg.index_topk} tokens "
              f"per query; its keys add {index:,} B per token (index_head_dim {cfg.index_head_dim} x "
              f"{cfg.num_hidden_layers} layers x 2 B): cache {mla + index:,} B per token")


def cmd_demo(args) -> None:
    """Build a model, run a forward and greedy decoding with the latent cache, save and reload it."""
    from .infer import greedy_generate

    require_flags(args, batch=1, prompt_len=1, max_new_tokens=1)
    require_folder(args.out, "--out")
    cfg = ModelConfig.preset(args.preset)
    if args.prompt_len + args.max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} exceed the "
                         f"{args.preset!r} preset's max_position_embeddings {cfg.max_position_embeddings}")
    torch.manual_seed(args.seed)
    model = build_model(cfg, seed=args.seed).eval()
    print(f"[1/4] built preset {args.preset!r}: {model.num_parameters():,} parameters "
          f"({model.num_parameters(activated=True):,} activated per token)")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len))
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(ids)
        naive_vs_absorbed = (logits - model(ids, absorb=True)).abs().max().item()
    print(f"[2/4] forward {tuple(ids.shape)} -> logits {tuple(logits.shape)} in {time.perf_counter() - t0:.2f}s; "
          f"naive vs absorbed MLA max |diff| {naive_vs_absorbed:.1e}")
    t0 = time.perf_counter()
    out = greedy_generate(model, ids, args.max_new_tokens)
    dt = time.perf_counter() - t0
    print(f"[3/4] greedy decoding with the latent cache: {args.batch * args.max_new_tokens / dt:.0f} tokens/s; "
          f"row 0 continues with {out[0, args.prompt_len:args.prompt_len + 12].tolist()} ...")
    print(f"      cache per token: {cfg.kv_cache_bytes_per_token(2):,} B (bf16) vs "
          f"{cfg.mha_cache_bytes_per_token(2):,} B for MHA")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or tmp
        save_pretrained(model, out_dir)
        reloaded = from_pretrained(out_dir, dtype=torch.float32)
        with torch.no_grad():
            diff = (reloaded(ids) - logits).abs().max().item()
        print(f"[4/4] saved HF-format checkpoint to {out_dir} and reloaded it: max |logit diff| {diff:.1e}")


def cmd_train(args) -> None:
    """Pretrain a model (MTP, aux-loss-free balancing) into --out; --resume continues the newest checkpoint."""
    from .train import TrainConfig, Trainer

    require_folder(args.out, "--out")
    cfg = TrainConfig.load(args.config, preset=args.preset, max_steps=args.max_steps, save_every=args.save_every,
                           seed=args.seed, data=args.data or None, tokenizer=args.tokenizer,
                           precision=args.precision, balance=args.balance, dp_shard=args.dp_shard,
                           dp_replicate=args.dp_replicate, ep=args.ep, pp=args.pp, pp_schedule=args.pp_schedule,
                           microbatches=args.microbatches, init_from=args.init_from, dsa_stage=args.dsa_stage,
                           compile=args.compile or None, defaults=COMMAND_DEFAULTS)
    trainer = Trainer(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    say = print if is_main_process() else (lambda *a, **k: None)  # under torchrun: rank 0 speaks
    say(f"training {cfg.preset!r} ({trainer.model.num_parameters():,} parameters) for {cfg.max_steps} steps "
          f"of {cfg.grad_accum * cfg.batch_size * cfg.seq_len:,} tokens into {args.out}"
          + (f", resuming at step {trainer.run.step}" if trainer.run.step else ""))
    last = trainer.fit()
    if last:
        say(f"done: step {last['step']}, loss {last['loss']:.4f}"
              + (f", val {last['val_loss']:.4f}" if "val_loss" in last else "")
              + f"; checkpoints in {trainer.run.ckpt_dir}, metrics and plots in {args.out}")


def cmd_tokenizer(args) -> None:
    """Train a byte-level BPE tokenizer on local files (or the embedded corpus) and save it."""
    from .data import default_corpus, load_documents, train_tokenizer

    docs = load_documents(args.data, text_field=args.text_field) if args.data else default_corpus(args.corpus_docs)
    if not docs:
        raise ValueError(f"no documents found in {args.data}")
    tok = train_tokenizer(docs, vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"trained a {tok.vocab_size}-token byte-level BPE on {len(docs):,} documents; saved to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the embedded default job: a small model end to end on CPU")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model preset (default: small)")
    p.add_argument("--batch", type=int, default=4, help="prompts decoded together (default: 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length (default: 32)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default=None, help="keep the checkpoint in this folder (default: a temp dir)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="pretraining with MTP and auxiliary-loss-free balancing (resumable)")
    p.add_argument("--config", default=None, help="a JSON or TOML TrainConfig file (flags override it)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model preset (default: small)")
    p.add_argument("--out", required=True, help="output folder: checkpoints/, metrics.jsonl, plots, tensorboard/")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: 200)")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: 100)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    p.add_argument("--data", nargs="*", default=None,
                   help="local .txt/.jsonl/.parquet files or folders (default: the embedded task corpus)")
    p.add_argument("--tokenizer", default=None, help="an existing tokenizer folder (default: train one)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="default: auto, bf16 where this machine's bf16 GEMMs are faster, else float32 (nanoseek "
                        "info --machine); fp8: DeepSeek-V3's FP8 recipe (docs/design/fp8.md)")
    p.add_argument("--balance", default=None, choices=["aux_free", "aux_loss", "none"],
                   help="expert balancing (default: aux_free)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the loss's forward: minutes of compiling first, faster steps after")
    p.add_argument("--init-from", default=None,
                   help="continue training this model folder (e.g. a YaRN context extension, DSA stages)")
    p.add_argument("--dsa-stage", default=None, choices=["none", "dense_warmup", "sparse"],
                   help="DeepSeek Sparse Attention training stage (docs/dsa.md; default: none)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    g = p.add_argument_group("parallelism, under torchrun (docs/distributed.md)")
    g.add_argument("--dp-shard", type=int, default=None, help="FSDP2 sharding degree (default: the ranks left)")
    g.add_argument("--dp-replicate", type=int, default=None, help="replicated data parallelism over FSDP groups")
    g.add_argument("--ep", type=int, default=None, help="expert parallelism, ranks taken from --dp-shard")
    g.add_argument("--pp", type=int, default=None, help="pipeline-parallel ranks")
    g.add_argument("--pp-schedule", default=None, choices=list(PP_SCHEDULES), help="pipeline schedule (default: 1F1B)")
    g.add_argument("--microbatches", type=int, default=None,
                   help="pipeline micro-batches per step (default: the fewest the schedule accepts)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)")
    p.add_argument("--out", required=True, help="folder to write the tokenizer into")
    p.add_argument("--data", nargs="*", default=None, help="local .txt/.jsonl/.parquet files or folders "
                   "(default: the embedded task corpus)")
    p.add_argument("--text-field", default="text", help="jsonl/parquet column with the documents (default: text)")
    p.add_argument("--vocab-size", type=int, default=8192, help="upper bound on the vocabulary (default: 8192)")
    p.add_argument("--corpus-docs", type=int, default=6000, help="documents of the embedded corpus (default: 6000)")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("info", help="parameter counts and KV-cache size of a preset or checkpoint")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model preset (default: small)")
    p.add_argument("--model", default=None, help="an HF-format checkpoint folder (overrides --preset)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="load weights holding NaN/Inf (default: refuse them, naming the tensor)")
    p.add_argument("--machine", action="store_true",
                   help="instead: this machine's fp32/bf16 GEMM rates and what --precision auto picks")
    p.add_argument("--decode", action="store_true",
                   help="with --machine: also eager vs compiled decode steps, what --compile auto of grpo/r1 uses "
                        "(measured once, about a minute)")
    p.add_argument("--remeasure", action="store_true", help="with --machine: measure again, not from the cache")
    p.set_defaults(func=cmd_info)

    # generate, chat, serve: nanoseek/serve/commands.py (FastAPI/uvicorn imported only by serve)
    from .serve.commands import add_parsers as add_inference_parsers
    add_inference_parsers(sub)
    # the R1 post-training stages: nanoseek/rl/cli_*.py
    from .rl import cli_grpo, cli_r1, cli_sft
    for module in (cli_sft, cli_grpo, cli_r1):
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:  # OSError: a missing or unreadable file
        message = " ".join(str(e).split("\n"))  # one line, also for messages that quote several
        print(f"nanoseek {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "TrainingAborted":
            raise
        print(f"nanoseek {args.command}: aborted: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
