"""Training data for `nanoseek train`: documents (local files or the embedded task corpus) -> tokenizer
(loaded, or trained on the training documents) -> packed train/validation rows.

Packed rows use plain causal attention over the row with positions 0..T-1 (documents separated by
BOS/EOS), the usual pretraining practice; see nanoseek/data/dataset.py for the document fields.

The trainer validates at its last step (and every val_every steps), so an empty validation split is an
error here, naming TrainConfig.val_fraction, rather than a "val 0.0000" in the log.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from ..data import (BatchIterator, PackedDataset, Tokenizer, build_datasets, default_corpus, eval_batches,
                    load_documents, train_tokenizer)
from .config import TrainConfig


@dataclass
class TrainData:
    tokenizer: Tokenizer
    train: BatchIterator
    val: PackedDataset

    def val_batches(self, batch_size: int, limit: int):
        return itertools.islice(eval_batches(self.val, batch_size), limit)


def prepare_data(cfg: TrainConfig, tokenizer_dir: str | None = None) -> TrainData:
    """`tokenizer_dir` (a checkpoint being resumed) wins over cfg.tokenizer; otherwise one is trained."""
    docs = load_documents(cfg.data, text_field=cfg.text_field) if cfg.data else \
        default_corpus(cfg.corpus_docs, seed=cfg.seed, split="train")
    if not docs:
        raise ValueError(f"no documents found in {cfg.data}")
    source = tokenizer_dir or cfg.tokenizer
    if source is not None:
        if not os.path.isfile(os.path.join(source, "tokenizer.json")):
            raise FileNotFoundError(f"no tokenizer.json in {source}")
        tokenizer = Tokenizer.load(source)
    else:
        tokenizer = train_tokenizer(docs, vocab_size=cfg.vocab_size)
    train, val = build_datasets(docs, tokenizer, cfg.seq_len, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if len(val) == 0:
        why = (" is 0" if cfg.val_fraction == 0 else
               f"={cfg.val_fraction} holds out none of the {len(docs)} document(s) (a split needs 2 or more)")
        raise ValueError(f"TrainConfig.val_fraction{why}: the validation split is empty, but the run validates "
                         "at its end; set val_fraction > 0 and give at least 2 documents")
    rows_needed = cfg.batch_size
    if len(train) < rows_needed:
        raise ValueError(f"the training data packs into {len(train)} rows of {cfg.seq_len + 1} tokens, fewer "
                         f"than one batch ({rows_needed}); add data or lower seq_len/batch_size")
    return TrainData(tokenizer, BatchIterator(train, cfg.batch_size, seed=cfg.seed), val)
