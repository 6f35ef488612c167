"""Integer expression trees: render, reduce step by step, and parse untrusted text safely.

The arithmetic and countdown tasks both build random expression trees, print them with the fewest
parentheses that keep the tree's structure (so Python's parser reads back exactly the same tree),
and explain them one operation at a time. Checking a model's answer must never run its text: `parse`
walks `ast.parse` output against a whitelist (integer literals, + - * /, optional unary minus) and
rejects everything else (names, calls, attributes, `**`) before anything is evaluated; evaluation is
exact (`fractions.Fraction`), so `/` is true division and "integer-exact" is a property we can test.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

OPS = ("+", "-", "*", "/")
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
MAX_EXPR_CHARS = 256  # answers are short; longer text is rejected before parsing


@dataclass(frozen=True)
class BinOp:
    """One binary operation `left op right`; leaves are plain ints."""

    op: str
    left: "Expr"
    right: "Expr"


Expr = Union[int, BinOp]


class ExprError(ValueError):
    """Text that is not a whitelisted integer expression, or an inexact/undefined evaluation."""


def apply(op: str, a: Fraction | int, b: Fraction | int) -> Fraction:
    """Exact value of `a op b`; raises ExprError on division by zero."""
    a, b = Fraction(a), Fraction(b)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ExprError("division by zero")
    return a / b


def evaluate(e: Expr, integer_only: bool = False) -> Fraction:
    """Exact value of a tree; with integer_only, every intermediate result must be an integer."""
    if isinstance(e, int):
        return Fraction(e)
    v = apply(e.op, evaluate(e.left, integer_only), evaluate(e.right, integer_only))
    if integer_only and v.denominator != 1:
        raise ExprError(f"inexact division gives {v}")
    return v


def render(e: Expr) -> str:
    """Infix text with minimal parentheses; `parse(render(e)) == e` for non-negative leaves.

    A left child needs parentheses when it binds weaker than its parent; a right child also when it
    binds equally (a - (b + c)), so the printed text keeps the tree's evaluation order exactly.
    Negative leaves (intermediate results in worked steps) print as "(-n)" inside an expression.
    """
    if isinstance(e, int):
        return str(e)

    def side(child: Expr, right: bool) -> str:
        if isinstance(child, int):
            return f"({child})" if child < 0 else str(child)
        weaker = _PREC[child.op] < _PREC[e.op] or (right and _PREC[child.op] == _PREC[e.op])
        return f"({render(child)})" if weaker else render(child)

    return f"{side(e.left, False)} {e.op} {side(e.right, True)}"


def leaves(e: Expr) -> list[int]:
    """The integer literals of a tree, left to right."""
    return [e] if isinstance(e, int) else leaves(e.left) + leaves(e.right)


def reduce_once(e: Expr) -> tuple[Expr, BinOp, int]:
    """Replace the leftmost operation whose operands are both numbers by its (integer) value.

    Returns (new tree, the operation done, its value). This is "innermost first, left to right",
    the order a person works through nested parentheses.
    """
    if isinstance(e, int):
        raise ValueError("a number has nothing left to reduce")
    if isinstance(e.left, int) and isinstance(e.right, int):
        v = apply(e.op, e.left, e.right)
        if v.denominator != 1:
            raise ExprError(f"inexact division {render(e)}")
        return int(v), e, int(v)
    if not isinstance(e.left, int):
        left, done, v = reduce_once(e.left)
        return BinOp(e.op, left, e.right), done, v
    right, done, v = reduce_once(e.right)
    return BinOp(e.op, e.left, right), done, v


def parse(text: str, allow_unary_minus: bool = False) -> Expr:
    """Parse untrusted text into a tree without evaluating anything.

    Only non-negative int literals, parentheses and + - * / are accepted (plus unary minus on a
    literal when allow_unary_minus). Anything else (names, calls, `**`, floats, strings, bools,
    over-long or deeply nested text) raises ExprError, so `__import__('os')` or `9**9**9` cost only
    a parse.
    """
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise ExprError(f"not an expression: {err}") from None

    def walk(node: ast.AST) -> Expr:
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return BinOp(_AST_OPS[type(node.op)], walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            return node.value
        if (allow_unary_minus and isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                and isinstance(node.operand, ast.Constant) and type(node.operand.value) is int):
            return -node.operand.value
        raise ExprError(f"disallowed syntax: {type(node).__name__}")

    try:
        return walk(tree.body)
    except RecursionError:
        raise ExprError("expression nested too deeply") from None
