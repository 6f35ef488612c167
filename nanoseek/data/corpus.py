"""The built-in pretraining corpus: nothing to download, every document checkable.

Documents are task examples in the R1 format (R1-Zero prompt, worked solution in <think>, answer in
<answer>), mixed evenly over tasks and over difficulty levels, plus a few paragraphs of natural
English about arithmetic and puzzles (natural.txt, shipped as package data) so the model also sees
ordinary prose. The test split of the tasks is never used for the "train" corpus, so the R1 stages
can evaluate on held-out problems; natural text appears only in the "train" corpus.
"""

from __future__ import annotations

import random
import re
from importlib import resources
from typing import Sequence

from .r1_format import r1_document
from .tasks import SPLITS, TASKS, Example, generate
from .tasks.expr import apply

NATURAL_TEXT_FILE = "natural.txt"
# one operation of a worked solution, "7 * 5 = 35": at a line start or after ": ", "= ", ", ", and not
# followed by another operator (that would make it part of a longer expression)
_STEP_RE = re.compile(r"(?:^|(?<=: )|(?<== )|(?<=, ))(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)(?![\d ]*[-+*/])", re.M)


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


def solution_steps(examples: Sequence[Example]) -> list[str]:
    """Every single operation "a op b = c" the worked solutions of `examples` compute, in order.

    Only steps whose arithmetic is right are kept (a guard against a pattern matching across two
    steps); the same fact appears as often as the solutions use it.
    """
    steps = []
    for ex in examples:
        for m in _STEP_RE.finditer(ex.solution):
            a, op, b, c = m.groups()
            if not (op == "/" and int(b) == 0) and apply(op, int(a), int(b)) == int(c):
                steps.append(m.group(0))
    return steps


def drill_documents(examples: Sequence[Example], n_docs: int, steps_per_doc: int = 40, seed: int = 0) -> list[str]:
    """`n_docs` drill sheets: random single operations of the examples' worked solutions, one per line.

    A tiny model pretrained on worked solutions alone learns to copy a question's numbers long before
    it learns the results of the operations (docs/r1_report.md); a drill sheet carries about ten times
    more results per token than a solution does, in the exact form the solutions use.
    """
    steps = solution_steps(examples)
    if not steps:
        raise ValueError("the examples' worked solutions contain no single-operation steps to drill")
    rng = random.Random(f"drills/{seed}")
    return ["\n".join(rng.choices(steps, k=steps_per_doc)) for _ in range(n_docs)]
