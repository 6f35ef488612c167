"""Task "countdown": reach a target from 3-4 numbers with + - * /, each number used at most once.

The TinyZero / Mini-R1 benchmark task (docs/design/grpo_sources.md), generated instead of downloaded:
a random expression over all the numbers is built first and its value becomes the target, so every
problem has a solution. Every division in it is exact and every intermediate value positive (the
classic rules), and the target is never one of the numbers.

The worked solution is a search trace in the spirit of Stream of Search (Gandhi et al. 2024): not a
guess followed by the answer, but a fixed procedure in which every line follows from the question and
the lines before it by single operations, so a small model can learn to run it. For three numbers it
works backwards from the target T:

    We need 48 from 1, 6, 7.
    Last 1, rest 6, 7: 6 + 7 = 13, 7 - 6 = 1, 6 * 7 = 42.
    Last 6, rest 1, 7: 1 + 7 = 8, 7 - 1 = 6, 1 * 7 = 7.
    48 / 6 = 8 yes.
    Check: 1 + 7 = 8, 8 * 6 = 48.
    So (1 + 7) * 6 = 48.

- Each number n in the order given is tried as the last operand (a number equal to one already tried
  is skipped: its block would be the same). Its block first lists what the other two make in one
  operation, a + b, larger - smaller, a * b, larger / smaller: positive, exact results only, and no
  "/ 1" (it equals "* 1"). Should one of them be T itself, the listing stops there with "yes" (a
  solution that leaves a number unused).
- Then the values the rest would have to make, in the order rest + n, rest * n, rest - n, n - rest,
  rest / n, n / rest (how often each is the last operation of generated level-1 problems):
  T - n if T > n, T / n if exact, T + n, n - T if n > T, T * n, n / T if exact. A value larger than
  every listed result cannot be made and is skipped without being written; the first value that is
  in the list gets "yes" and ends the search.
- Four numbers reduce to three: each pair in order lists its results the same way ("3, 5: ...") and
  each result r starts a three-number search "Try r, c, d." for the same T (a pair equal to an earlier
  pair, or a result equal to an earlier one of the same pair, is skipped).

The last operation of a three-number tree has a single number on one side, and a four-number tree has
an operation on two given numbers, so the search is complete: it solves every generated problem (this
is checked when a problem is made, never assumed). The answer is the expression found, which may use
fewer numbers than the one the target was built from; the trace ends with its operations in
evaluation order and "So EXPR = T.". Level-1 traces are short (about 100 tokens of the project
tokenizer typically, at most about 240 with the answer, so they fit a 256-token completion); four-number
traces run to hundreds or a few thousand tokens when the first pairs fail.

`countdown_check` accepts any expression (not only ours) that uses each given number at most once,
only + - * / and parentheses, divides exactly and equals the target; it parses with a whitelist
(`expr.parse`) and never evaluates the text itself.
"""

from __future__ import annotations

import random
from collections import Counter
from itertools import combinations
from typing import Sequence

from .base import Example, TaskSpec, canonical_key
from .expr import OPS, BinOp, Expr, ExprError, evaluate, leaves, parse, reduce_once, render

NAME = "countdown"
# level -> (how many numbers, largest number, largest target)
_LEVELS = {1: (3, 10, 100), 2: (4, 25, 200), 3: (4, 100, 1000)}
# a number during the search: its value and the expression over given numbers that makes it
Item = tuple[int, Expr]


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


def _pair(a: Item, b: Item) -> list[tuple[str, Item]]:
    """What two numbers make in one operation, as ("x op y = v", (v, expression)), in listing order."""
    (va, ea), (vb, eb) = a, b
    (hi, e_hi), (lo, e_lo) = (a, b) if va >= vb else (b, a)
    out = [(f"{va} + {vb} = {va + vb}", (va + vb, BinOp("+", ea, eb)))]
    if hi > lo:
        out.append((f"{hi} - {lo} = {hi - lo}", (hi - lo, BinOp("-", e_hi, e_lo))))
    out.append((f"{va} * {vb} = {va * vb}", (va * vb, BinOp("*", ea, eb))))
    if lo > 1 and hi % lo == 0:
        out.append((f"{hi} / {lo} = {hi // lo}", (hi // lo, BinOp("/", e_hi, e_lo))))
    return out


def _listing(head: str, results: list[tuple[str, Item]], goal: int) -> tuple[str, Expr | None]:
    """The line listing `results`, cut at (and marking) one equal to the goal, and that result's expression."""
    shown = []
    for text, (v, e) in results:
        shown.append(text)
        if v == goal:
            return f"{head}: {', '.join(shown)} yes.", e
    return f"{head}: {', '.join(shown)}.", None


def _needs(goal: int, n: int) -> list[tuple[str, int, str, bool]]:
    """What the rest must make if `n` is the last operand: ("T - n = r", r, last op, n on the left)."""
    out = []
    if goal > n:
        out.append((f"{goal} - {n} = {goal - n}", goal - n, "+", False))
    if n > 1 and goal % n == 0:
        out.append((f"{goal} / {n} = {goal // n}", goal // n, "*", False))
    out.append((f"{goal} + {n} = {goal + n}", goal + n, "-", False))
    if n > goal:
        out.append((f"{n} - {goal} = {n - goal}", n - goal, "-", True))
    if n > 1:
        out.append((f"{goal} * {n} = {goal * n}", goal * n, "/", False))
    if goal > 1 and n > goal and n % goal == 0:
        out.append((f"{n} / {goal} = {n // goal}", n // goal, "/", True))
    return out


def _search3(items: list[Item], goal: int, lines: list[str]) -> Expr | None:
    """Backward search over three numbers (see the module docstring); appends its lines."""
    for i, (n, e_n) in enumerate(items):
        if any(n == m for m, _ in items[:i]):  # the same number again: the same block again
            continue
        a, b = (it for j, it in enumerate(items) if j != i)
        results = _pair(a, b)
        line, found = _listing(f"Last {n}, rest {a[0]}, {b[0]}", results, goal)
        lines.append(line)
        if found is not None:
            return found
        made = {v: e for _, (v, e) in reversed(results)}  # first listed expression per value
        largest = max(made)
        tried = []
        for text, r, op, n_left in _needs(goal, n):
            if r > largest:
                continue
            if r in made:
                lines.append(", ".join(tried + [text + " yes"]) + ".")
                return BinOp(op, e_n, made[r]) if n_left else BinOp(op, made[r], e_n)
            tried.append(text)
        if tried:
            lines.append(", ".join(tried) + ".")
    return None


def _search4(items: list[Item], goal: int, lines: list[str]) -> Expr | None:
    """Each pair in order, each of its results in turn, reduced to a three-number search.

    A pair equal to an earlier pair, or a result equal to an earlier result of the same pair, would
    only repeat searches already written, so it is skipped.
    """
    pairs_done = set()
    for i, j in combinations(range(len(items)), 2):
        key = tuple(sorted((items[i][0], items[j][0])))
        if key in pairs_done:
            continue
        pairs_done.add(key)
        rest = [it for k, it in enumerate(items) if k not in (i, j)]
        results = _pair(items[i], items[j])
        line, found = _listing(f"{items[i][0]}, {items[j][0]}", results, goal)
        lines.append(line)
        if found is not None:
            return found
        values_done = set()
        for _, made in results:
            if made[0] in values_done:
                continue
            values_done.add(made[0])
            lines.append(f"Try {', '.join(str(v) for v, _ in [made] + rest)}.")
            found = _search3([made] + rest, goal, lines)
            if found is not None:
                return found
    return None


def search_trace(numbers: Sequence[int], target: int) -> tuple[str, str] | None:
    """(worked solution, answer expression) for 3 or 4 numbers, or None when the search fails."""
    items: list[Item] = [(n, n) for n in numbers]
    lines = [f"We need {target} from {', '.join(map(str, numbers))}."]
    search = {3: _search3, 4: _search4}[len(items)]
    found = search(items, target, lines)
    if found is None:
        return None
    answer = render(found)
    lines += [f"Check: {_steps(found)}.", f"So {answer} = {target}."]
    return "\n".join(lines), answer


def make(rng: random.Random, difficulty: int) -> Example:
    count, hi, max_target = _LEVELS[difficulty]
    while True:
        nums = [rng.randint(1, hi) for _ in range(count)]
        built = _combine(rng, nums)
        if built is None:
            continue
        target = evaluate(built)
        if target.denominator == 1 and 1 <= target <= max_target and int(target) not in nums:
            target = int(target)
            break
    solved = search_trace(nums, target)
    # the search is complete, so a miss is a bug to report, not a problem to skip
    if solved is None or not countdown_check(nums, target, solved[1]):
        raise RuntimeError(f"countdown search found no verified answer for {nums} -> {target} ({render(built)})")
    solution, answer = solved
    shown = ", ".join(map(str, nums))
    question = (f"Using the numbers [{shown}], create an expression that equals {target}. "
                f"You can use + - * / and each number at most once.")
    return Example(task=NAME, question=question, answer=answer, solution=solution,
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
