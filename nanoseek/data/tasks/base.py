"""The shape every task shares: one `Example`, one `TaskSpec`, and the rule that splits train from test.

Train and test are separated by the *problem*, not by the seed: every problem has a canonical key
(e.g. the sorted countdown numbers plus the target), and a keyed hash of that key puts the problem in
the test split or the train split once and for all. So no seed, `n` or difficulty can ever produce a
test problem in train, the R1 stages can draw more training data later without leaking the
held-out set, and generation needs no list of test questions to deduplicate against.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

SPLITS = ("train", "test")
TEST_BUCKETS = 10  # 1 in 10 problems of every task belongs to the test split


@dataclass(frozen=True)
class Example:
    """One verifiable problem.

    Attributes:
        task: name of the task family (a key of TASKS).
        question: the problem as shown to the model.
        answer: canonical final answer (what goes between <answer> and </answer>).
        solution: worked step-by-step solution ending at the answer (the <think> part).
        difficulty: level, 1 (easiest) .. the task's highest level.
        meta: the structured problem the checker needs (e.g. countdown numbers and target).
    """

    task: str
    question: str
    answer: str
    solution: str
    difficulty: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (for saving a held-out set as .jsonl)."""
        d = asdict(self)
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Example":
        return cls(**{**d, "meta": dict(d.get("meta", {}))})


@dataclass(frozen=True)
class TaskSpec:
    """A task family.

    Attributes:
        name: registry key.
        levels: the difficulty levels `make` accepts.
        make: (rng, difficulty) -> Example, one random problem with its worked solution.
        check: (example, predicted answer text) -> bool, programmatic verification.
        key: canonical identity of a problem; equal keys are the same problem however it is phrased.
    """

    name: str
    levels: tuple[int, ...]
    make: Callable[[random.Random, int], Example]
    check: Callable[[Example, str], bool]
    key: Callable[[Example], str]


def canonical_key(task: str, problem: Any) -> str:
    """A stable text key for a problem given as JSON-able data."""
    return task + ":" + json.dumps(problem, sort_keys=True, separators=(",", ":"))


def split_of(key: str) -> str:
    """"test" for the fixed 1/TEST_BUCKETS of all problems, else "train" (a stable hash, not hash())."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"nanoseek-split").digest()
    return "test" if int.from_bytes(digest, "big") % TEST_BUCKETS == 0 else "train"


def generate_from(spec: TaskSpec, split: str, n: int, difficulty: int | None = None,
                  seed: int = 0) -> list[Example]:
    """`n` distinct examples of one task in one split; see `registry.generate`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if difficulty is not None and difficulty not in spec.levels:
        raise ValueError(f"task {spec.name!r} has difficulty levels {spec.levels}, got {difficulty!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A string seed is hashed with SHA-512 by random.seed, so streams are stable across processes.
    rng = random.Random(f"{spec.name}/{split}/{seed}/{difficulty}")
    out: list[Example] = []
    seen: set[str] = set()
    budget = 200 * n + 1000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"found only {len(out)} distinct {split} problems of task {spec.name!r} at "
                             f"difficulty {difficulty}; ask for fewer or a harder level")
        level = difficulty if difficulty is not None else rng.choice(spec.levels)
        ex = spec.make(rng, level)
        key = spec.key(ex)
        if key in seen or split_of(key) != split:
            continue
        seen.add(key)
        out.append(ex)
    return out


_MAX_ANSWER_CHARS = 64
_INTEGER_RE = re.compile(
    r"(?:(?P<var>[A-Za-z])\s*=\s*)?(?P<sign>[+-]?)\s*(?P<digits>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.0+)?\.?")


def parse_integer(text: str, variable: str | None = None) -> int | None:
    """The integer a short answer states, or None.

    Tolerates surrounding whitespace, a sign ("-5", "+ 5"), a trailing ".0"/".00", a final period,
    thousands commas ("1,234") and, when `variable` is given, a leading "x =" / "x=". Anything else
    (words, digits split by spaces, other decimals, expressions) is None: the checker wants the final
    value, not a formula.
    """
    if not isinstance(text, str) or len(text) > _MAX_ANSWER_CHARS:
        return None
    m = _INTEGER_RE.fullmatch(text.strip())
    if m is None or (m["var"] is not None and (variable is None or m["var"].lower() != variable.lower())):
        return None
    digits = m["digits"].replace(",", "")
    return (-1 if m["sign"] == "-" else 1) * int(digits)

