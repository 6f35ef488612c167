"""SFT examples and batches: rows -> token sequences with completion-only labels -> micro-batches.

Examples. Every SFT row (nanoseek/rl/data.py) becomes one token sequence `prompt + completion + EOS`:
- {"messages": [..., assistant]}: template "chat" renders every message but the last with the
  tokenizer's chat template and the generation prompt (`BOS <|User|>q<|Assistant|>`); template
  "r1_zero" renders the single user message as the R1-Zero prompt. The completion is the last
  message's content; when the template's generation prompt already opens the think block (DeepSeek-R1's ends
  with "<think>\n"), the completion's own opening of it is dropped, so the model learns to continue inside
  the block as it will at inference, not to open a second one.
- {"prompt", "completion"}: raw text, the prompt after BOS (a prompt that already starts with BOS
  keeps just that one).
Prompt and completion are encoded separately, as at inference time, where the engine continues the
encoded prompt, so the border the model learns is the border it meets. Labels are the next tokens
with every prompt target set to IGNORE_INDEX: the loss covers the completion and its EOS only (the
EOS teaches the model to stop). A sequence longer than `seq_len + 1` tokens loses the end of its
completion; one whose prompt alone fills the window has nothing to learn and is dropped; both are
counted in one warning, never an error.

No packing across examples. nanoseek's MLA has no document mask (the naive path runs `is_causal`
attention over the whole row, nanoseek/model/mla.py), so two examples in one row would let a
completion attend to the other example. Each row holds one example, right-padded to the longest row
of its micro-batch (never to seq_len); right padding cannot change the earlier tokens under causal
attention, so a batch's loss equals its examples' losses taken one by one (tests/test_sft.py).
Grouping by length (SFTConfig.packing) recovers most of packing's throughput: examples of similar
length share a micro-batch (sorted within windows of GROUP_WINDOW micro-batches of the epoch's
shuffle, then the micro-batches shuffled), so little compute goes to padding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import jinja2
import numpy as np
import torch

from ..data.dataset import IGNORE_INDEX
from ..data.r1_format import THINK
from ..data.tokenizer import Tokenizer
from ..model.buckets import bucketed
from .data import prompt_text

GROUP_WINDOW = 32  # micro-batches per length-sorting window (enough to group, still shuffled)


def encode_row(row: Mapping, tokenizer: Tokenizer, template: str = "chat") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + EOS) of one SFT row (see the module docstring)."""
    msgs = row.get("messages")
    if msgs is not None:
        context, completion = msgs[:-1], msgs[-1]["content"]
        if template == "chat":
            try:
                prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True)
            except jinja2.TemplateError as e:  # e.g. the template's raise_exception on an unknown role
                raise ValueError(f"the chat template refuses the messages: {e}") from None
            completion = _after_prefilled_think(prompt, completion)
        else:
            if len(context) != 1 or context[0].get("role") != "user":
                raise ValueError(f"template {template!r} needs exactly one user message before the assistant's")
            prompt = prompt_text(context[0]["content"], tokenizer, template)
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids, completion = tokenizer.encode(row["prompt"]), row["completion"]
        bos = tokenizer.special_id("bos_token", "a prompt/completion SFT row (its prompt starts with BOS)")
        if prompt_ids[:1] != [bos]:
            prompt_ids = [bos, *prompt_ids]
    eos = tokenizer.special_id("eos_token", "SFT (an EOS ends every completion)")
    return prompt_ids, [*tokenizer.encode(completion), eos]


def _after_prefilled_think(prompt: str, completion: str) -> str:
    """The completion without the think-block opening that the prompt's end already wrote (R1's "<think>\\n")."""
    if not prompt.rstrip().endswith(THINK):
        return completion
    prefilled = prompt[prompt.rfind(THINK):]
    for opening in (prefilled, THINK):
        if completion.startswith(opening):
            return completion[len(opening):]
    return completion


@dataclass
class SFTExample:
    """One training sequence: `tokens` (prompt + completion + EOS, cut at seq_len + 1) and how many
    of them are prompt. Inputs are tokens[:-1]; target i is tokens[i + 1], labelled when i + 1 >= n_prompt."""

    tokens: list[int]
    n_prompt: int

    def labels(self) -> list[int]:
        return [t if i + 1 >= self.n_prompt else IGNORE_INDEX for i, t in enumerate(self.tokens[1:])]


def build_examples(rows: Sequence[Mapping], tokenizer: Tokenizer, seq_len: int,
                   template: str = "chat") -> list[SFTExample]:
    """Tokenize rows into examples; truncated and dropped rows are reported in one warning."""
    # every example ends with EOS and every batch is padded: a tokenizer that names neither fails here, once
    tokenizer.special_id("eos_token", "SFT (an EOS ends every completion)")
    tokenizer.special_id("pad_token", "SFT (rows are padded to the longest)")
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows, 1):
        try:
            prompt, completion = encode_row(row, tokenizer, template)
        except ValueError as e:
            raise ValueError(f"SFT row {i}: {e}") from None
        tokens = prompt + completion
        if len(prompt) >= seq_len + 1:
            dropped += 1
            continue
        if len(tokens) > seq_len + 1:
            truncated += 1
            tokens = tokens[:seq_len + 1]
        examples.append(SFTExample(tokens, len(prompt)))
    if truncated or dropped:
        warnings.warn(f"seq_len={seq_len}: {truncated} of {len(rows)} examples truncated (their completions lose "
                      f"the end, EOS included), {dropped} dropped (the prompt alone fills the window)", stacklevel=2)
    if not examples:
        raise ValueError(f"no SFT example fits in seq_len={seq_len} tokens; raise seq_len")
    return examples


def collate_examples(examples: Sequence[SFTExample], pad_id: int,
                     bucket_limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), int64 [B, T] right-padded to the longest example (labels IGNORE_INDEX there). With
    bucket_limit > 0, T is rounded up to a bucket (nanoseek/model/buckets.py), at most bucket_limit: few distinct
    shapes for a CPU bf16 run."""
    T = max(len(ex.tokens) - 1 for ex in examples)
    if bucket_limit:
        T = max(T, min(bucketed(T), bucket_limit))
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.tokens) - 1
        ids[b, :n] = torch.tensor(ex.tokens[:-1])
        labels[b, :n] = torch.tensor(ex.labels())
    return ids, labels


class SFTBatches:
    """Endless micro-batches of example indices, reshuffled each epoch, resumable exactly.

    Epoch e's order is a permutation seeded by (seed, e) cut into micro-batches of `batch_size` (the
    last may be smaller: no example is skipped). With `group_by_length`, each window of GROUP_WINDOW
    micro-batches is sorted by length before cutting and the micro-batches are then shuffled.
    State: (epoch, index of the next micro-batch in the epoch).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_by_length: bool = True):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.group = batch_size, seed, group_by_length
        self.epoch, self.index = 0, 0
        self._cached = (-1, [])

    @property
    def per_epoch(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        if self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.lengths))
            B = self.batch_size
            if self.group:
                w = B * GROUP_WINDOW
                order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                        for c in np.split(order, range(w, len(order), w))])
            batches = [order[i:i + B] for i in range(0, len(order), B)]
            if self.group:
                batches = [batches[j] for j in rng.permutation(len(batches))]
            self._cached = (epoch, batches)
        return self._cached[1]

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        self.index += 1
        return self._batches(self.epoch)[self.index - 1]

    @property
    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.index / self.per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.lengths), "group_by_length": int(self.group)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; ValueError when it came from other data or batching."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "num_examples", "group_by_length"):
            if state.get(key, mine[key]) != mine[key]:
                raise ValueError(f"cannot resume: the checkpoint has {key}={state[key]}, this run has {mine[key]}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
