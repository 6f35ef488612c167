"""The built-in pretraining corpus: nothing to download, every document checkable.

Documents are task examples in the R1 format (R1-Zero prompt, worked solution in <think>, answer in
<answer>), mixed evenly over tasks and over difficulty levels, plus a few paragraphs of natural
English about arithmetic and puzzles (natural.txt, shipped as package data) so the model also sees
ordinary prose. The test split of the tasks is never used for the "train" corpus, so the R1 stages
can evaluate on held-out problems; natural text appears only in the "train" corpus.
"""

from __future__ import annotations

import random
from importlib import resources
from typing import Sequence

from .r1_format import r1_document
from .tasks import SPLITS, TASKS, generate

NATURAL_TEXT_FILE = "natural.txt"


def natural_paragraphs() -> list[str]:
    """The paragraphs (blank-line separated) of the shipped natural-text file."""
    text = resources.files(__package__).joinpath(NATURAL_TEXT_FILE).read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def default_corpus(n_docs: int, seed: int = 0, split: str = "train", tasks: Sequence[str] | None = None,
                   natural_every: int = 20) -> list[str]:
    """`n_docs` documents, deterministic in (n_docs, seed, split, tasks, natural_every).

    Args:
        n_docs: number of documents returned.
        seed: selects the task problems and the shuffle.
        split: "train" or "test"; task problems come from that split only.
        tasks: task names to mix (default: all registered tasks), in equal shares.
        natural_every: about one document in this many is a natural-text paragraph (train split only;
            0 disables them). Paragraphs repeat when n_docs is large: there are only a few.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = list(tasks) if tasks is not None else sorted(TASKS)
    if not names:
        raise ValueError("tasks must name at least one task")
    paragraphs = natural_paragraphs() if split == "train" and natural_every > 0 else []
    n_natural = n_docs // natural_every if paragraphs else 0
    n_task = n_docs - n_natural
    docs = [paragraphs[i % len(paragraphs)] for i in range(n_natural)]
    for i, name in enumerate(names):
        share = n_task // len(names) + (1 if i < n_task % len(names) else 0)
        docs += [r1_document(ex) for ex in generate(name, split, share, seed=seed)]
    random.Random(f"corpus/{split}/{seed}").shuffle(docs)
    return docs
