"""Task "countdown": reach a target from 3-4 numbers with + - * /, each number used at most once.

The TinyZero / Mini-R1 benchmark task (grpo_anchors.md §3.3, §4), generated instead of downloaded:
a random expression over all the numbers is built first and its value becomes the target, so every
problem has a solution. Every division in it is exact and every intermediate value positive (the
classic rules), and the target is never one of the numbers. The worked solution shows a search: one
to three failed tries, each checked and rejected with a "Wait, ..." line, then the expression that
hits the target and a re-check of its arithmetic and of the numbers it uses.

`countdown_check` accepts any expression (not only ours) that uses each given number at most once,
only + - * / and parentheses, divides exactly and equals the target; it parses with a whitelist
(`expr.parse`) and never evaluates the text itself.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

from .base import Example, TaskSpec, canonical_key
from .expr import OPS, BinOp, Expr, ExprError, evaluate, leaves, parse, reduce_once, render

NAME = "countdown"
# level -> (how many numbers, largest number, largest target)
_LEVELS = {1: (3, 10, 100), 2: (4, 25, 200), 3: (4, 100, 1000)}


def _combine(rng: random.Random, nums: list[int]) -> Expr | None:
    """A random expression over all of `nums` in random order; None when a rule is broken."""
    pool: list[Expr] = list(nums)
    rng.shuffle(pool)
    while len(pool) > 1:
        i = rng.randrange(len(pool) - 1)
        a, b = pool[i], pool[i + 1]
        op = rng.choice(OPS)
        va, vb = evaluate(a), evaluate(b)
        if op in "-/" and va < vb:  # keep intermediates positive and divisions possibly exact
            a, b, va, vb = b, a, vb, va
        if op == "-" and va == vb:
            return None
        if op == "/" and (vb == 0 or va % vb != 0 or vb == 1):
            return None
        pool[i:i + 2] = [BinOp(op, a, b)]
    return pool[0]


def _steps(e: Expr) -> str:
    """'9 - 5 = 4, 4 * 7 = 28': the operations of a tree in evaluation order."""
    parts = []
    cur = e
    while not isinstance(cur, int):
        cur, done, v = reduce_once(cur)
        parts.append(f"{render(done)} = {v}")
    return ", ".join(parts)


def _miss(value: int, target: int) -> str:
    d = value - target
    return f"{value} is {abs(d)} {'more' if d > 0 else 'less'} than {target}"


def make(rng: random.Random, difficulty: int) -> Example:
    count, hi, max_target = _LEVELS[difficulty]
    while True:
        nums = [rng.randint(1, hi) for _ in range(count)]
        found = _combine(rng, nums)
        if found is None:
            continue
        target = evaluate(found)
        if target.denominator == 1 and 1 <= target <= max_target and int(target) not in nums:
            target = int(target)
            break
    tries: list[Expr] = []
    want = rng.choice((1, 2, 3))
    for _ in range(200):  # failed tries: other expressions over a subset of the numbers
        if len(tries) == want:
            break
        subset = rng.sample(nums, rng.randint(2, count))
        e = _combine(rng, subset)
        if e is not None and evaluate(e) != target and evaluate(e).denominator == 1:
            tries.append(e)
    shown = ", ".join(map(str, nums))
    lines = [f"We need {target} from {shown}, using + - * / and each number at most once."]
    for e in tries:
        v = int(evaluate(e))
        lines.append(f"Try {render(e)}: {_steps(e)}.")
        lines.append(f"Wait, {_miss(v, target)}, so that does not work.")
    answer = render(found)
    lines.append(f"Try {answer}: {_steps(found)}.")
    lines.append(f"That hits {target}. Let me re-check: {_steps(found)}, and it uses "
                 f"{', '.join(map(str, sorted(leaves(found))))}, each given number at most once.")
    lines.append(f"So {answer} = {target}.")
    question = (f"Using the numbers [{shown}], create an expression that equals {target}. "
                f"You can use + - * / and each number at most once.")
    return Example(task=NAME, question=question, answer=answer, solution="\n".join(lines),
                   difficulty=difficulty, meta={"numbers": nums, "target": target})


def countdown_check(numbers: Sequence[int], target: int, expr: str) -> bool:
    """True when `expr` reaches `target` using each of `numbers` at most once.

    Rules: only integer literals, parentheses and + - * / (no unary minus, no `**`, no names);
    the literals must be a sub-multiset of `numbers`; every division must be exact; the value must
    equal `target`. "×", "÷" are read as "*", "/", and a trailing "= target" is allowed.
    Untrusted text is parsed, never executed, and rejected before evaluation if it breaks a rule.
    """
    if not isinstance(expr, str):
        return False
    text = expr.replace("×", "*").replace("÷", "/")
    if "=" in text:
        text, _, rhs = text.partition("=")
        if rhs.strip() != str(target):
            return False
    try:
        tree = parse(text)
        if Counter(leaves(tree)) - Counter(numbers):  # a literal not given, or given too few times
            return False
        return evaluate(tree, integer_only=True) == target
    except ExprError:
        return False


def check(example: Example, predicted: str) -> bool:
    return countdown_check(example.meta["numbers"], example.meta["target"], predicted)


SPEC = TaskSpec(name=NAME, levels=tuple(_LEVELS), make=make, check=check,
                key=lambda ex: canonical_key(NAME, [sorted(ex.meta["numbers"]), ex.meta["target"]]))
