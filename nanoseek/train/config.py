"""TrainConfig: everything `nanoseek train` needs besides the model architecture.

Loaded from defaults, then an optional JSON/TOML file, then command-line overrides; validated on
construction with errors that name the field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..config import PRESETS, Validator, is_number, load_config
from ..machine import PRECISIONS
from ..dist.mesh import PP_SCHEDULES

_BALANCE = ("aux_free", "aux_loss", "none")
_DSA_STAGES = ("none", "dense_warmup", "sparse")


@dataclass
class TrainConfig:
    """Pretraining settings (defaults: a few-minute CPU run of the `small` preset on the embedded corpus).

    Attributes:
        preset: model preset name (nanoseek.config.PRESETS).
        model: per-field overrides of the preset (e.g. {"num_hidden_layers": 2}); vocab_size follows the tokenizer.
        data: local text/jsonl/parquet files or folders; empty = the embedded task corpus.
        text_field: the jsonl/parquet column holding documents.
        tokenizer: an existing tokenizer folder; None trains a byte-level BPE on the training data.
        vocab_size: size of the trained tokenizer.
        corpus_docs: documents generated for the embedded corpus.
        seq_len: tokens per training sequence.
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_steps: optimizer steps.
        lr, min_lr_ratio, warmup_steps, schedule: AdamW peak LR, final LR fraction, linear warmup steps,
            and the decay shape ("cosine", "wsd" or "constant").
        weight_decay, beta1, beta2, grad_clip: AdamW and global-norm clipping (0 disables clipping).
        precision: "auto" (bf16 where this machine's bf16 GEMMs are faster, else float32; nanoseek/machine.py),
            "float32", "bf16" (autocast; weights and optimizer state stay fp32) or "fp8" (DeepSeek-V3's FP8
            recipe for the projections and experts, nanoseek/fp8/convert.py, the rest in bf16 autocast).
        optimizer_moments: dtype of AdamW's two moments, "float32" or "bf16" (V3's low-precision optimizer states;
            the update is computed in fp32 either way).
        compile: run the loss's forward (and so its backward) through torch.compile (inductor): the first steps
            compile, about two minutes for the `small` preset on 2 CPU cores; then a bf16 step of that preset ran
            1.32x faster, an fp32 one 1.06x, on an AMX Xeon (benchmarks/README.md, machine B). One process; not
            with DSA training or fp8.
        mtp_lambda, mtp_lambda_late, mtp_switch_frac: MTP loss weight, first then late value, switched at
            this fraction of training (V3: 0.3 then 0.1 at 10/14.8).
        balance: "aux_free" (bias updates, V3), "aux_loss" (classic batch-wise auxiliary loss) or "none".
        bias_gamma, bias_gamma_late, gamma_switch_frac: bias update speed, early then late (V3: 0.001, then 0
            for the last 500B of 14.8T tokens).
        seq_aux_alpha: weight of the complementary sequence-wise balance loss (V3: 1e-4; 0 disables).
        aux_loss_alpha: weight of the classic auxiliary loss when balance == "aux_loss".
        val_fraction: share of documents held out for validation.
        val_every, val_batches: validation period (steps) and size (micro-batches).
        log_every: steps between log lines / metric rows.
        save_every: steps between checkpoints (0: only at the end).
        keep_checkpoints: complete checkpoints kept on disk (older ones are deleted).
        max_bad_steps: consecutive NaN/Inf losses tolerated (each skips its step) before aborting.
        peak_gflops: matmul peak for the MFU estimate; None measures it once at start.
        seed: seeds model init, data order and dropout-free training exactly.
        threads: torch CPU threads (0: torch's default).
        device: "cpu", "cuda", ... (None: cuda when available, else the local rank's GPU under torchrun, else cpu).
        dp_shard, dp_replicate, ep, pp, pp_schedule, microbatches: the parallel layout under torchrun (`--dp-shard`
            ... ; docs/distributed.md): FSDP2 sharding degree (-1: the ranks the others leave), replicated data
            parallelism (HSDP), expert parallelism (ranks taken from dp_shard), pipeline ranks, the pipeline
            schedule (1F1B, Interleaved1F1B, ZBVZeroBubble, DualPipeV) and its micro-batches per step (None: the
            fewest it accepts). The global batch (batch_size x grad_accum rows) does not depend on them.
        init_from: an HF-format model folder (e.g. a checkpoint of an earlier run) to continue training instead of
            building `preset`: its architecture with `model` overrides applied, its weights, and its tokenizer
            unless `tokenizer` is set. Overrides may add a DSA indexer (freshly initialised from `seed`) or change
            index_topk, rope_scaling and max_position_embeddings, e.g. a YaRN context extension (V3: 4K -> 32K ->
            128K) with a longer seq_len.
        dsa_stage: DeepSeek Sparse Attention training (V3.2 report §2.1; docs/design/dsa.md): "none"; "dense_warmup"
            (dense attention, everything but the indexers frozen, loss = the indexers' KL to the head-summed main
            attention; V3.2: lr 1e-3); "sparse" (top-k attention, the whole model on the language-model loss and
            each indexer, on detached inputs, on its KL over the tokens it selected; V3.2: lr 7.3e-6). Needs a
            model with an indexer (index_n_heads, index_head_dim, index_topk).
    """

    preset: str = "small"
    model: dict = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    text_field: str = "text"
    tokenizer: str | None = None
    vocab_size: int = 2048
    corpus_docs: int = 6000
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "float32"
    optimizer_moments: str = "float32"
    compile: bool = False
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_switch_frac: float = 10 / 14.8
    balance: str = "aux_free"
    bias_gamma: float = 1e-3
    bias_gamma_late: float = 0.0
    gamma_switch_frac: float = 14.3 / 14.8
    seq_aux_alpha: float = 1e-4
    aux_loss_alpha: float = 1e-2
    val_fraction: float = 0.05
    val_every: int = 50
    val_batches: int = 4
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    peak_gflops: float | None = None
    seed: int = 0
    threads: int = 0
    device: str | None = None
    dp_shard: int = -1
    dp_replicate: int = 1
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"
    microbatches: int | None = None
    init_from: str | None = None
    dsa_stage: str = "none"

    def __post_init__(self):
        v = Validator(self)
        v.ints("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "val_batches", "vocab_size",
               "keep_checkpoints", "max_bad_steps", "corpus_docs")
        v.ints("warmup_steps", "save_every", "val_every", "threads", "seed", minimum=0)
        v.number("lr", 0, open_low=True)
        v.number("min_lr_ratio", 0, 1)
        v.one_of("schedule", ("cosine", "wsd", "constant"))
        v.one_of("precision", PRECISIONS)
        v.one_of("optimizer_moments", ("float32", "bf16"))
        v.one_of("balance", _BALANCE)
        v.number("val_fraction", 0, 1, open_high=True)
        v.number("beta1", 0, 1, open_high=True)
        v.number("beta2", 0, 1, open_high=True)
        for name in ("grad_clip", "mtp_lambda", "mtp_lambda_late", "bias_gamma", "bias_gamma_late", "seq_aux_alpha",
                     "aux_loss_alpha", "weight_decay"):
            v.number(name, 0)
        for name in ("mtp_switch_frac", "gamma_switch_frac"):
            v.number(name, 0, 1)
        v.require(self.peak_gflops is None or (is_number(self.peak_gflops) and self.peak_gflops > 0), "peak_gflops",
                  "must be a number > 0 or None")
        v.paths("data")
        v.require(isinstance(self.model, dict), "model", "must be a mapping of ModelConfig fields")
        v.ints("dp_replicate", "ep", "pp")
        v.require(self.dp_shard == -1 or (isinstance(self.dp_shard, int) and self.dp_shard >= 1), "dp_shard",
                  "must be a positive int or -1")
        v.one_of("pp_schedule", PP_SCHEDULES)
        v.ints("microbatches", optional=True)
        v.one_of("dsa_stage", _DSA_STAGES)
        v.flags("compile")
        v.require(not self.compile or (self.dsa_stage == "none" and self.pp == 1 and self.precision != "fp8"),
                  "compile", "covers the fp32/bf16 language-model loss only: not with dsa_stage, pp or fp8")
        if self.init_from is not None:
            v.require(isinstance(self.init_from, str) and os.path.isfile(os.path.join(self.init_from, "config.json")),
                      "init_from", "must be a model folder holding a config.json")
            if self.tokenizer is None and os.path.isfile(os.path.join(self.init_from, "tokenizer.json")):
                self.tokenizer = self.init_from
            v.require(self.tokenizer is not None, "tokenizer", "must be set when init_from holds no tokenizer.json "
                      "(continued training keeps the model's token ids)")
        elif self.dsa_stage != "none":
            v.require(bool(self.model.get("index_topk") or PRESETS.get(self.preset, {}).get("index_topk")), "dsa_stage",
                      "needs a model with an indexer: set index_n_heads, index_head_dim and index_topk in `model`")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, defaults: dict | None = None, **overrides) -> "TrainConfig":
        """Defaults <- `defaults` <- JSON/TOML file <- overrides (None values are ignored)."""
        return load_config(cls, path, overrides, defaults)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
