"""Packed next-token training data: documents -> fixed-length rows -> resumable, shuffled batches.

Packing. Each document is tokenized as `[BOS] + tokens + [EOS]`; all documents are concatenated in
order and the stream is cut into rows of `seq_len + 1` tokens (inputs are a row's first seq_len
tokens, targets its last seq_len). Rows do not overlap, so every token is in exactly one row; a
document longer than the room left simply continues in the next row. The last row is padded with
`pad_id`. Per token we also keep:
- `positions`: distance from the most recent document start or row start, whichever is later. So
  RoPE positions restart at 0 at each BOS; a document continued from the previous row restarts at 0
  at the row start (RoPE only sees position differences, and that piece cannot see its beginning).
- `doc_ids`: which document segment of the row a token belongs to, 0, 1, 2, ... from the left (the
  first segment may be the tail of a document begun in the previous row); -1 on padding.
  `document_causal_mask` turns them into an attention mask that stops attention across documents.
Use `positions` and `doc_ids` together: with plain causal attention over the whole row, a token would
see earlier documents' keys at larger RoPE positions than its own, so a trainer without document
masking should pass positions 0..T-1 (ordinary packed training) and may ignore both fields.

Batches (`Batch`, all int64 [B, seq_len]): input_ids, labels (targets, IGNORE_INDEX where the target is
padding), positions and doc_ids of the inputs. `BatchIterator` yields them forever, reshuffling rows
each epoch with a permutation seeded by (seed, epoch); its `state_dict()` is just (epoch, index),
so a restored iterator continues with exactly the batches the interrupted one would have produced.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import numpy as np
import torch

from .tokenizer import Tokenizer

IGNORE_INDEX = -100  # the default ignore_index of torch.nn.functional.cross_entropy


def split_documents(docs: Sequence[str], val_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded split of whole documents into (train, validation); no document is in both.

    The validation share is round(val_fraction * len(docs)), at least 1 when val_fraction > 0 and
    there are two or more documents. Both lists keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(val_fraction * len(docs))
    if val_fraction > 0 and len(docs) >= 2:
        n_val = max(1, n_val)
    val = set(random.Random(f"split/{seed}").sample(range(len(docs)), n_val))
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer) -> list[list[int]]:
    """`[BOS] + encode(doc) + [EOS]` for each document."""
    bos = tokenizer.special_id("bos_token", "pretraining data (BOS and EOS around every document)")
    eos = tokenizer.special_id("eos_token", "pretraining data (BOS and EOS around every document)")
    return [[bos, *ids, eos] for ids in tokenizer.encode_batch(docs)]


@dataclass
class Batch:
    """One training batch; every field is an int64 tensor of shape [B, T] with T = seq_len.

    Attributes:
        input_ids: tokens fed to the model.
        labels: next tokens (input_ids shifted by one); IGNORE_INDEX where the target is padding.
        positions: RoPE position of each input token (restarts at 0 at every BOS and at row start).
        doc_ids: document segment of each input token within its row (0, 1, ...); -1 on padding.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


class PackedDataset(torch.utils.data.Dataset):
    """Rows of `seq_len + 1` packed tokens; item i is a dict of int64 [seq_len + 1] tensors
    "tokens", "positions", "doc_ids" (see the module docstring).

    Args:
        token_docs: tokenized documents, each already `[BOS, ..., EOS]` (see tokenize_documents).
        seq_len: training context length T; rows hold T + 1 tokens.
        pad_id: token that fills the end of the last row.
    """

    def __init__(self, token_docs: Sequence[Sequence[int]], seq_len: int, pad_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.pad_id = seq_len, pad_id
        lengths = np.array([len(d) for d in token_docs], dtype=np.int64)
        total = int(lengths.sum())
        row = seq_len + 1
        n_rows = -(-total // row)
        tokens = np.full(n_rows * row, pad_id, dtype=np.int32)
        doc_pos = np.full(n_rows * row, -1, dtype=np.int32)  # position inside the document; -1 = padding
        if total:
            tokens[:total] = np.fromiter((t for d in token_docs for t in d), dtype=np.int32, count=total)
            starts = np.cumsum(lengths) - lengths
            doc_pos[:total] = np.arange(total) - np.repeat(starts, lengths)
        self.tokens = torch.from_numpy(tokens.reshape(n_rows, row))
        self.doc_pos = torch.from_numpy(doc_pos.reshape(n_rows, row))
        self.num_tokens, self.num_docs = total, len(token_docs)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> "PackedDataset":
        """Tokenize `texts` (BOS/EOS around each) and pack them."""
        pad = tokenizer.special_id("pad_token", "packing (the last row is padded)")
        return cls(tokenize_documents(texts, tokenizer), seq_len, pad)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        dp = self.doc_pos[i].long()
        pad = dp < 0
        positions = torch.minimum(dp, torch.arange(dp.numel())).masked_fill(pad, 0)
        starts = (dp == 0).long()
        doc_ids = (starts.cumsum(0) - starts[0]).masked_fill(pad, -1)
        return {"tokens": self.tokens[i].long(), "positions": positions, "doc_ids": doc_ids}


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> Batch:
    """Stack rows from PackedDataset into a Batch (inputs = row[:-1], labels = row[1:])."""
    tokens = torch.stack([r["tokens"] for r in rows])
    positions = torch.stack([r["positions"] for r in rows])
    doc_ids = torch.stack([r["doc_ids"] for r in rows])
    labels = tokens[:, 1:].masked_fill(doc_ids[:, 1:] < 0, IGNORE_INDEX)
    return Batch(input_ids=tokens[:, :-1], labels=labels, positions=positions[:, :-1], doc_ids=doc_ids[:, :-1])


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, T] attention mask (True = may attend): causal and within the same document.

    Padding (doc id -1) attends only to padding, so no row of the mask is all False.
    """
    T = doc_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


class BatchIterator:
    """Endless batches over a PackedDataset, reshuffled every epoch, resumable exactly.

    Each step takes the next `batch_size * world_size` rows of the epoch's permutation (seeded by
    (seed, epoch)); rank r gets its slice r. The incomplete tail of an epoch is skipped (a different
    tail each epoch when shuffling). State: `epoch` and `index` (rows of this epoch already used).

    Args:
        dataset: the rows.
        batch_size: rows per batch on this rank.
        seed: shuffle seed.
        shuffle: False keeps row order (for evaluation).
        rank, world_size: data-parallel slicing of every global batch.
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.global_batch = batch_size * world_size
        if batch_size < 1 or len(dataset) < self.global_batch:
            raise ValueError(f"need 1 <= batch_size * world_size <= len(dataset); got batch_size={batch_size}, "
                             f"world_size={world_size}, len(dataset)={len(dataset)}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.index + self.global_batch > len(self.dataset):
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index + self.rank * self.batch_size
        rows = self._epoch_order()[start:start + self.batch_size]
        self.index += self.global_batch
        return collate([self.dataset[int(i)] for i in rows])

    def state_dict(self) -> dict[str, int]:
        """Where the iterator is, plus what it must be restored into (checked by load_state_dict)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "global_batch": self.global_batch,
                "num_rows": len(self.dataset), "shuffle": int(self.shuffle)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; raises ValueError if it came from a different data/batch/seed setup."""
        mine = self.state_dict()
        for key in ("seed", "global_batch", "num_rows", "shuffle"):
            if state.get(key, mine[key]) != mine[key]:
                raise ValueError(f"cannot resume: state has {key}={state[key]}, this iterator has {mine[key]}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(dataset: PackedDataset, batch_size: int) -> Iterator[Batch]:
    """Every row once, in order (last batch may be smaller): for validation loss."""
    for s in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])


def build_datasets(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, val_fraction: float = 0.05,
                   seed: int = 0) -> tuple[PackedDataset, PackedDataset]:
    """Split `docs` by document (split_documents), then tokenize and pack each side: (train, val)."""
    train, val = split_documents(docs, val_fraction, seed)
    return PackedDataset.from_texts(train, tokenizer, seq_len), PackedDataset.from_texts(val, tokenizer, seq_len)
