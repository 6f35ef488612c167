"""Task "linear": solve a linear equation in x with an integer solution, e.g. `3x + 5 = 20`.

The worked solution is the school procedure: gather the x terms on the left, move the constant to
the right, divide by the coefficient, then substitute back to check. Levels: 1 = `ax + b = c` with a
single-digit coefficient and solution; 2 = the same with larger numbers; 3 = negative coefficients and
solutions; 4 = x on both sides, `ax + b = dx + e`. The answer is the value of x; "x = 5" and "5.0" are
accepted by the checker.
"""

from __future__ import annotations

import random

from .base import Example, TaskSpec, canonical_key, parse_integer

NAME = "linear"
_LEVELS = (1, 2, 3, 4)


def side(a: int, b: int) -> str:
    """'3x + 5', '-x - 2', '4x', '7' for a*x + b."""
    if a == 0:
        return str(b)
    x = {1: "x", -1: "-x"}.get(a, f"{a}x")
    if b == 0:
        return x
    return f"{x} {'+' if b > 0 else '-'} {abs(b)}"


def _p(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


def _nonzero(rng: random.Random, lo: int, hi: int, avoid: tuple[int, ...] = (0,)) -> int:
    while True:
        v = rng.randint(lo, hi)
        if v not in avoid:
            return v


def make(rng: random.Random, difficulty: int) -> Example:
    if difficulty == 1:
        a, d, x, b = rng.randint(2, 9), 0, rng.randint(0, 9), rng.randint(1, 15)
    elif difficulty == 2:
        a, d, x, b = rng.randint(2, 9), 0, rng.randint(0, 12), rng.randint(1, 20)
    elif difficulty == 3:
        a, d, x, b = _nonzero(rng, -12, 12, (0, 1, -1)), 0, rng.randint(-15, 15), _nonzero(rng, -30, 30)
    else:
        a = _nonzero(rng, -12, 12)
        d = _nonzero(rng, -12, 12, (0, a - 1, a, a + 1))  # leaves |a - d| >= 2 to divide by
        x, e = rng.randint(-15, 15), rng.randint(-30, 30)
        b = (d - a) * x + e
    if d == 0:
        e = a * x + b  # the equation a*x + b = d*x + e holds at x by construction
    lhs, rhs = side(a, b), side(d, e)
    lines = []
    k = a - d
    if d:
        verb = "Subtract" if d > 0 else "Add"
        lines.append(f"{verb} {side(abs(d), 0)} {'from' if d > 0 else 'to'} both sides: {side(k, b)} = {e}.")
    const = e - b
    if b:
        verb = "Subtract" if b > 0 else "Add"
        lines.append(f"{verb} {abs(b)} {'from' if b > 0 else 'to'} both sides: "
                     f"{side(k, 0)} = {e} {'-' if b > 0 else '+'} {abs(b)} = {const}.")
    lines.append(f"Divide both sides by {k}: x = {const} / {_p(k)} = {x}.")
    left = f"{_p(a)} * {_p(x)} + {_p(b)}" if b else f"{_p(a)} * {_p(x)}"
    if d:
        right = f"{_p(d)} * {_p(x)} + {_p(e)}"
        lines.append(f"Check: {left} = {a * x + b} and {right} = {d * x + e}. Both sides agree.")
    else:
        lines.append(f"Check: {left} = {a * x + b}, which is the right side.")
    return Example(task=NAME, question=f"Solve for x: {lhs} = {rhs}.", answer=str(x),
                   solution="\n".join(lines), difficulty=difficulty,
                   meta={"a": a, "b": b, "d": d, "e": e})


def check(example: Example, predicted: str) -> bool:
    """True when `predicted` gives the solution ("7", "x = 7", "7.0" all count)."""
    got = parse_integer(predicted, variable="x")
    return got is not None and got == int(example.answer)


SPEC = TaskSpec(name=NAME, levels=_LEVELS, make=make, check=check,
                key=lambda ex: canonical_key(NAME, [ex.meta[k] for k in "abde"]))
