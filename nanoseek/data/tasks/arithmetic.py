"""Task "arithmetic": multi-step integer expressions such as `(37 + 48) * 3 - 19`.

The worked solution evaluates one operation at a time, innermost first and left to right, and
rewrites the remaining expression after each step, so a model can learn the procedure rather than
the result. Only + - * appear (no division), every intermediate value stays small enough for a tiny
model, and the answer is the integer value. Levels: 1 = two operations on 1..9 with every value within
+-100 (single-digit facts), 2 = two on 1..20, 3 = three on 1..50, 4 = four or five on 1..99.
"""

from __future__ import annotations

import random

from .base import Example, TaskSpec, canonical_key, parse_integer
from .expr import BinOp, Expr, evaluate, reduce_once, render

NAME = "arithmetic"
# level -> (operation counts, largest literal, largest |intermediate value|)
_LEVELS = {1: ((2,), 9, 100), 2: ((2,), 20, 500), 3: ((3,), 50, 5_000), 4: ((4, 5), 99, 50_000)}


def _tree(rng: random.Random, n_ops: int, hi: int) -> Expr:
    if n_ops == 0:
        return rng.randint(1, hi)
    left = rng.randint(0, n_ops - 1)
    return BinOp(rng.choice("+-*"), _tree(rng, left, hi), _tree(rng, n_ops - 1 - left, hi))


def _bounded(e: Expr, limit: int) -> bool:
    """Every intermediate value (not only the result) is within +-limit."""
    if isinstance(e, int):
        return True
    return _bounded(e.left, limit) and _bounded(e.right, limit) and abs(evaluate(e)) <= limit


def worked_solution(e: Expr) -> tuple[str, int]:
    """The step-by-step text for a tree and its value."""
    lines = ["Evaluate one operation at a time, innermost first, left to right."]
    cur = e
    while not isinstance(cur, int):
        cur, done, v = reduce_once(cur)
        step = f"{render(done)} = {v}"
        lines.append(f"{step}, so the expression becomes {render(cur)}." if not isinstance(cur, int)
                     else f"{step}.")
    lines.append(f"So {render(e)} = {cur}.")
    return "\n".join(lines), cur


def make(rng: random.Random, difficulty: int) -> Example:
    counts, hi, limit = _LEVELS[difficulty]
    while True:
        e = _tree(rng, rng.choice(counts), hi)
        if _bounded(e, limit):
            break
    solution, value = worked_solution(e)
    expr = render(e)
    return Example(task=NAME, question=f"Compute {expr}.", answer=str(value), solution=solution,
                   difficulty=difficulty, meta={"expression": expr})


def check(example: Example, predicted: str) -> bool:
    """True when `predicted` states the value (whitespace, "+", ".0", commas tolerated)."""
    got = parse_integer(predicted)
    return got is not None and got == int(example.answer)


SPEC = TaskSpec(name=NAME, levels=tuple(_LEVELS), make=make, check=check,
                key=lambda ex: canonical_key(NAME, ex.meta["expression"]))
