"""Rule-based rewards for R1-style GRPO (R1 v2 §2.2 eq. 4, §3.2.1 eq. 7; docs/design/grpo_sources.md).

Every reward is a plain function `fn(completions, examples, **kwargs) -> list[float]`, one score per
completion, the batch API of TRL's reward functions: extra keyword arguments (`think_opened`,
`completion_lengths`, `completion_ids`, `tokenizer`) are passed to every function, and a function
ignores the ones it does not use, so a user's reward plugs in the same way. `REWARDS` names the
built-ins, `get_reward(name, **params)` binds parameters, and `combine` returns the per-reward scores
(for logging) next to their weighted sum (R1-Zero: accuracy + format with equal weights).

Key choices:
- The final answer (`final_answer`) is deliberately strict: the reasoning ends at the first `</think>`;
  after it there must be no think tag and exactly one `<answer>...</answer>` block (opening tag
  first). Answer blocks drafted inside the reasoning are ignored; two answer blocks, nested or
  unclosed tags, or a `<think>` that never closes give no answer (reward 0), so a model cannot hedge
  by answering twice. With no think block at all the whole completion is searched (format_reward is
  what demands the think block; accuracy_reward(require_format=True) demands it too).
- Built-in tasks (an `Example`, or its dict with a known "task") are checked by their task checker,
  which parses and never executes model text. Anything else with an "answer" (a mapping such as
  GSM8K's {"question", "answer"}, or an Example of another task) is compared with math_verify, gold
  first (`verify(gold, pred)` is not symmetric); for GSM8K references the text after "####" is the
  gold. A reference math_verify cannot parse scores 0 for every completion (a data bug, not a crash).
- math_verify runs with its signal-based timeouts on the main thread; elsewhere signals are
  unavailable, so the timeouts are off and only the cheap guards protect us: answers longer than
  MAX_ANSWER_CHARS are rejected, and parsed expressions whose exponents or factorials are huge
  (e.g. 10^{10^{10}}, the way to stall sympy) are rejected before the comparison.
- `think_opened=True` judges a completion as if it began with "<think>" (for prompts that pre-fill
  the opening tag, as TinyZero's and R1-Distill's templates do).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol, Sequence, Union

from ..data.r1_format import ANSWER, END_ANSWER, END_THINK, THINK, format_ok
from ..data.tasks import TASKS, Example, check
from ..data.tasks.expr import ExprError, evaluate, parse
from .data import question_of

ExampleLike = Union[Example, Mapping[str, Any]]
MAX_ANSWER_CHARS = 1000  # an answer block longer than this is not a final answer (and would be slow to parse)
_MAX_EXPONENT = 10_000  # |exponent| or factorial argument above this is rejected before sympy evaluates it


class RewardFunction(Protocol):
    """`fn(completions, examples, **kwargs) -> list[float]`: one score per completion, same order."""

    def __call__(self, completions: Sequence[str], examples: Sequence[ExampleLike] | None = None,
                 **kwargs: Any) -> list[float]: ...


# ---- extraction -----------------------------------------------------------------------------------

def final_answer(completion: str, think_opened: bool = False) -> str | None:
    """The text of the one answer block after the reasoning, stripped; None when there is none.

    Rule (see the module docstring): the reasoning ends at the first `</think>`; after it there must
    be no think tag and exactly one `<answer>`, one `</answer>`, in that order. Without `</think>`
    the whole completion is searched, unless it opens a `<think>` (then the answer is still inside
    unfinished reasoning: None). Blocks longer than MAX_ANSWER_CHARS give None.
    """
    text = (THINK + completion) if think_opened else completion
    if END_THINK in text:
        tail = text.split(END_THINK, 1)[1]
    elif THINK in text:
        return None
    else:
        tail = text
    if THINK in tail or END_THINK in tail or tail.count(ANSWER) != 1 or tail.count(END_ANSWER) != 1:
        return None
    start, end = tail.index(ANSWER) + len(ANSWER), tail.index(END_ANSWER)
    if end < start:
        return None
    answer = tail[start:end].strip()
    return answer if len(answer) <= MAX_ANSWER_CHARS else None


def think_text(completion: str, think_opened: bool = False) -> str | None:
    """The text of the first `<think>...</think>` block, or None when there is no closed block."""
    text = (THINK + completion) if think_opened else completion
    start = text.find(THINK)
    end = text.find(END_THINK, start + len(THINK)) if start >= 0 else -1
    return text[start + len(THINK):end] if end >= 0 else None


# ---- math answers (math_verify) -----------------------------------------------------------------

_DELIMITED = re.compile(r"\$|\\\(|\\\[")
_LATEX_LIKE = re.compile(r"[\\{}^()\[\],]")


def _as_math(text: str) -> str:
    """Text for math_verify.parse: bare LaTeX-looking answers wrapped in $...$, Python `**` as `^`.

    math_verify reads bare text with its plain-expression parser, which takes e.g. "\\{1, 2\\}" as 2;
    inside $...$ it is a set. Plain words and numbers ("72 dollars", "x = 42") stay bare, where that
    parser finds the number.
    """
    text = text.strip().replace("**", "^")
    if not _DELIMITED.search(text) and _LATEX_LIKE.search(text):
        text = f"${text}$"
    return text


def gold_text(reference: str) -> str:
    """The reference answer string: the part after the last "####" for GSM8K-style solutions."""
    if "####" in reference:
        reference = reference.rsplit("####", 1)[1].replace(",", "")
    return reference.strip()


def _too_big(parsed: Sequence[Any]) -> bool:
    """Whether a parsed answer holds a power or factorial big enough to stall sympy's comparison."""
    import sympy

    for item in parsed:
        if not isinstance(item, sympy.Basic):
            continue
        for node in sympy.preorder_traversal(item):
            arg = (node.exp if isinstance(node, sympy.Pow)
                   else node.args[0] if isinstance(node, sympy.factorial) else None)
            # towers like 9^(9^9) stay unevaluated, so size the exponent numerically (cheap in mpmath)
            if arg is not None and arg.is_number and not abs(sympy.N(arg, 3)) <= _MAX_EXPONENT:
                return True
    return False


def math_equal(reference: str, predicted: str, timeout: int = 2) -> bool:
    """Whether `predicted` is mathematically the reference answer (math_verify, gold first).

    `timeout` (whole seconds, math_verify's signal alarm) bounds parse and verify on the main thread;
    off the main thread it is disabled (signals are main-thread only) and only the size guards hold.
    An unparseable reference gives False.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    if len(predicted) > MAX_ANSWER_CHARS:
        return False
    t = timeout if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(_as_math(gold_text(reference)), extraction_mode="first_match", parsing_timeout=t)
        pred = parse(_as_math(predicted), parsing_timeout=t)
        if not gold or not pred or _too_big(pred):
            return False
        return bool(verify(gold, pred, timeout_seconds=t))
    except (Exception, TimeoutException):
        return False


# ---- rewards ------------------------------------------------------------------------------------

def _check_lengths(completions: Sequence[str], examples: Sequence[Any] | None) -> None:
    if examples is not None and len(examples) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(examples)} examples; "
                         f"repeat each example once per completion")


def is_correct(example: ExampleLike, answer: str | None, timeout: int = 2) -> bool:
    """The task's checker for built-in tasks (`Example` or dict with a known "task"); math_verify
    against the example's "answer" (an Example's .answer) for anything else."""
    if isinstance(example, Example):
        task, reference = example.task, example.answer
    elif isinstance(example, Mapping) and isinstance(example.get("answer"), str):
        task, reference = example.get("task"), example["answer"]
    else:
        raise TypeError(f"cannot check an example of type {type(example).__name__}: expected an Example, "
                        f"its to_dict() form, or a mapping with a string 'answer'")
    if answer is None:
        return False
    return check(example, answer) if task in TASKS else math_equal(reference, answer, timeout)


def accuracy_reward(completions: Sequence[str], examples: Sequence[ExampleLike], *, think_opened: bool = False,
                    require_format: bool = False, timeout: int = 2, **_: Any) -> list[float]:
    """1.0 when the final answer (`final_answer`) is correct, else 0.0 (R1-Zero accuracy reward).

    Args:
        completions: model outputs (without the prompt).
        examples: the example each completion answers (repeat an example G times for a group).
        think_opened: the prompt ended with "<think>"; judge completions as if they started with it.
        require_format: also demand the full R1 template (format_reward == 1), else 0.
        timeout: math_verify timeout in whole seconds (main thread only).
    """
    if examples is None:
        raise ValueError("accuracy_reward needs the examples the completions answer")
    _check_lengths(completions, examples)
    out = []
    for text, ex in zip(completions, examples):
        ok = not require_format or format_ok((THINK + text) if think_opened else text)
        out.append(float(ok and is_correct(ex, final_answer(text, think_opened), timeout)))
    return out


def format_reward(completions: Sequence[str], examples: Sequence[ExampleLike] | None = None, *,
                  think_opened: bool = False, **_: Any) -> list[float]:
    """1.0 for `<think>...</think>` then `<answer>...</answer>`, each tag once, only whitespace around.

    With think_opened the completion is judged as "<think>" + completion, so it must not open the
    tag again.
    """
    _check_lengths(completions, examples)
    return [float(format_ok((THINK + t) if think_opened else t)) for t in completions]


_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")
_WORD = re.compile(r"[^\W\d_]+")


def cot_words(text: str) -> list[str]:
    """Words of a text: maximal runs of letters (digits, symbols, punctuation split them); each CJK
    ideograph, kana or hangul syllable is a word of its own, since those scripts use no spaces."""
    return _WORD.findall(_CJK.sub(r" \1 ", text))


def language_consistency_reward(completions: Sequence[str], examples: Sequence[ExampleLike] | None = None, *,
                                think_opened: bool = False, is_target: Callable[[str], bool] = str.isascii,
                                **_: Any) -> list[float]:
    """Share of the reasoning's words in the target language, in [0, 1] (R1 v2 §3.2.1 eq. 7).

    Our definition: words are `cot_words` of the first think block; a word is in the target language
    when `is_target(word)`, by default when all its letters are ASCII (English script, so "naïve" or
    "思" are not). No closed think block, or one with no words, scores 0.0: there is no reasoning to
    reward, and empty reasoning must not earn the bonus.
    """
    _check_lengths(completions, examples)
    out = []
    for text in completions:
        words = cot_words(think_text(text, think_opened) or "")
        out.append(sum(map(is_target, words)) / len(words) if words else 0.0)
    return out


def _token_lengths(completions: Sequence[str], kwargs: Mapping[str, Any]) -> list[int]:
    """Completion lengths in tokens from `completion_lengths`, `completion_ids` or `tokenizer`."""
    if kwargs.get("completion_lengths") is not None:
        lengths = [int(n) for n in kwargs["completion_lengths"]]
    elif kwargs.get("completion_ids") is not None:
        lengths = [len(ids) for ids in kwargs["completion_ids"]]
    elif kwargs.get("tokenizer") is not None:  # must not add BOS/EOS (nanoseek's Tokenizer does not)
        lengths = [len(kwargs["tokenizer"].encode(t)) for t in completions]
    else:
        raise ValueError("length rewards need completion_lengths=, completion_ids= or tokenizer=")
    if len(lengths) != len(completions):
        raise ValueError(f"got {len(lengths)} lengths for {len(completions)} completions")
    return lengths


def soft_overlong_reward(completions: Sequence[str], examples: Sequence[ExampleLike] | None = None, *,
                         max_length: int, cache: int, **kwargs: Any) -> list[float]:
    """DAPO's soft overlong punishment (DAPO eq. 13), lengths in tokens.

    0 for |y| <= max_length - cache, then linear (max_length - cache - |y|) / cache down to -1 at
    |y| = max_length, and -1 beyond. DAPO uses max_length 20,480 with cache 4,096; set max_length to
    the sampler's max_new_tokens. Lengths come from `completion_lengths`, `completion_ids` or `tokenizer`.
    """
    if not 0 < cache <= max_length:
        raise ValueError(f"need 0 < cache <= max_length, got cache={cache}, max_length={max_length}")
    _check_lengths(completions, examples)
    free = max_length - cache
    return [0.0 if n <= free else -1.0 if n > max_length else (free - n) / cache
            for n in _token_lengths(completions, kwargs)]


def cosine_length_reward(completions: Sequence[str], examples: Sequence[ExampleLike], *, max_length: int,
                         min_value_correct: float = 0.5, max_value_correct: float = 1.0,
                         min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                         think_opened: bool = False, timeout: int = 2, **kwargs: Any) -> list[float]:
    """Length-scaled correctness (arXiv 2502.03373 App. C.1; open-r1 `cosine`); replaces accuracy.

    r = a + (b - a) * (1 + cos(pi * min(|y|, L) / L)) / 2, which is b at length 0 and a at L = max_length
    (tokens). Correct: a = min_value_correct, b = max_value_correct (shorter correct answers earn more).
    Wrong: a = max_value_wrong, b = min_value_wrong (a short wrong answer costs -1.0, a long one -0.5,
    so exploring is punished less). These are the paper's values; open-r1's CLI default
    min_value_wrong = 0.0 would make short wrong answers better than long ones.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be > 0, got {max_length}")
    lengths = _token_lengths(completions, kwargs)
    correct = accuracy_reward(completions, examples, think_opened=think_opened, timeout=timeout)
    out = []
    for n, c in zip(lengths, correct):
        a, b = (min_value_correct, max_value_correct) if c else (max_value_wrong, min_value_wrong)
        out.append(a + 0.5 * (b - a) * (1.0 + math.cos(math.pi * min(n, max_length) / max_length)))
    return out


def repetition_penalty_reward(completions: Sequence[str], examples: Sequence[ExampleLike] | None = None, *,
                              ngram_size: int = 3, max_penalty: float = -1.0, **_: Any) -> list[float]:
    """(1 - distinct n-grams / n-grams) * max_penalty over lower-cased whitespace words, in [max_penalty, 0].

    arXiv 2502.03373 App. C.2 (open-r1 `repetition_penalty`, n = 3, max_penalty -1). Texts shorter
    than n words score 0.
    """
    if ngram_size < 1 or max_penalty > 0:
        raise ValueError(f"need ngram_size >= 1 and max_penalty <= 0, got {ngram_size}, {max_penalty}")
    _check_lengths(completions, examples)
    out = []
    for text in completions:
        words = text.lower().split()
        grams = [tuple(words[i:i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
        out.append((1.0 - len(set(grams)) / len(grams)) * max_penalty if grams else 0.0)
    return out


# An arithmetic side of an equation: digits, spaces, + - * / and parentheses, at least one digit.
_SIDE_CHARS = "0123456789 +-*/()"
_NUMBER = re.compile(r"\d+")


def _side(text: str, from_end: bool) -> str | None:
    """The arithmetic run that ends text (from_end) or starts it, stripped, or None when it holds no digit
    or touches a letter with no space between (as in "3x", where the side is not a number)."""
    chars = reversed(text) if from_end else iter(text)
    run = []
    for ch in chars:
        if ch not in _SIDE_CHARS:
            if (ch.isalnum() or ch == "_") and run and not run[-1].isspace():
                return None
            break
        run.append(ch)
    side = "".join(reversed(run) if from_end else run).strip()
    return side if any(c.isdigit() for c in side) else None


def equation_spans(text: str, question: str | None = None) -> list[tuple[int, int, bool]]:
    """(start, end, holds) for each integer equation in text, in order; text[start:end] is "A = B".

    An equation is "A = B" where both sides are whitelisted integer expressions (tasks.expr.parse:
    literals, + - * /, parentheses; never executed) and at least one side has an operator; chains
    ("x = 11 - 8 = 3") give one equation per "=" whose two neighbours are both arithmetic, and a
    side next to a letter ("3x = ...") is not arithmetic. Values are exact fractions; a division by
    zero makes the equation false.

    With `question`, an equation holds only if it is also grounded: every number on its left side
    appears in the question or on the right side of an earlier equation. Checked for truth alone, a
    weak policy learns to write true but idle equations ("x = 0 / 5 = 0", "1 * 1 = 1") instead of the
    solution's (docs/r1_report.md).
    """
    known = set(_NUMBER.findall(question)) if question is not None else None
    parts = text.split("=")
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + len(part) + 1)  # where the next part starts, past its "="
    out = []
    for k, (left_text, right_text) in enumerate(zip(parts, parts[1:])):
        left, right = _side(left_text, from_end=True), _side(right_text, from_end=False)
        if left is None or right is None or not any(op in left + right for op in "+-*/"):
            continue
        try:
            trees = parse(left, allow_unary_minus=True), parse(right, allow_unary_minus=True)
        except ExprError:  # e.g. an unbalanced parenthesis: not an equation
            continue
        try:
            holds = evaluate(trees[0]) == evaluate(trees[1])
        except ExprError:  # division by zero
            holds = False
        if known is not None:
            holds = holds and all(n in known for n in _NUMBER.findall(left))
            known.update(_NUMBER.findall(right))
        right_start = offsets[k + 1]
        start = left_text.rindex(left)  # the stripped side lies inside the run at the end of left_text
        end = right_start + right_text.index(right) + len(right)
        out.append((offsets[k] + start, end, holds))
    return out


def equations(text: str, question: str | None = None) -> list[bool]:
    """Whether each integer equation in text holds, in order of appearance (`equation_spans`)."""
    return [holds for _, _, holds in equation_spans(text, question)]


def equation_reward(completions: Sequence[str], examples: Sequence[ExampleLike] | None = None, *,
                    think_opened: bool = False, **_: Any) -> list[float]:
    """Share of the reasoning's integer equations that hold (`equations`, grounded in the example's
    question when examples are given), in [0, 1]; 0 without a closed think block or without equations.

    A rule-based check of the worked steps, not of the answer: with accuracy alone, a sample whose
    "11 - 8 = 4" and "4 / 3 = 1" happen to land on the right answer is rewarded for both slips, and
    two samples that differ only in a slip the answer does not see get the same advantage. This
    reward separates them. It is a proxy (a policy can still write fewer equations), so it belongs
    next to the accuracy reward, not instead of it; with weight 0 it is only logged.
    """
    _check_lengths(completions, examples)
    out = []
    for i, text in enumerate(completions):
        think = think_text(text, think_opened)
        question = question_of(examples[i]) if examples is not None else None
        checks = equations(think, question) if think is not None else []
        out.append(sum(checks) / len(checks) if checks else 0.0)
    return out


REWARDS: Mapping[str, Callable[..., list[float]]] = MappingProxyType({
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language": language_consistency_reward,
    "soft_overlong": soft_overlong_reward,
    "cosine": cosine_length_reward,
    "repetition": repetition_penalty_reward,
    "equations": equation_reward,
})


def get_reward(name: str, **params: Any) -> RewardFunction:
    """The built-in reward `name` with keyword parameters bound (e.g. max_length= for "soft_overlong")."""
    try:
        fn = REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}") from None
    return functools.update_wrapper(functools.partial(fn, **params), fn) if params else fn


# ---- combining ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardScores:
    """total[i] = sum_k weight_k * per_reward[name_k][i]; per_reward keeps each function's raw scores."""

    total: list[float]
    per_reward: dict[str, list[float]]

    def __add__(self, other: "RewardScores") -> "RewardScores":
        """The scores of two batches scored by the same rewards, one after the other."""
        return RewardScores(self.total + other.total, {k: v + other.per_reward[k] for k, v in self.per_reward.items()})


@dataclass(frozen=True)
class CombinedReward:
    """Several rewards called on the same batch; `__call__` returns a RewardScores."""

    names: tuple[str, ...]
    fns: tuple[RewardFunction, ...]
    weights: tuple[float, ...]

    def __call__(self, completions: Sequence[str], examples: Sequence[ExampleLike] | None = None,
                 **kwargs: Any) -> RewardScores:
        per: dict[str, list[float]] = {}
        for name, fn in zip(self.names, self.fns):
            scores = [float(s) for s in fn(completions, examples, **kwargs)]
            if len(scores) != len(completions) or not all(map(math.isfinite, scores)):
                raise ValueError(f"reward {name!r} must return {len(completions)} finite floats, got {scores[:8]}")
            per[name] = scores
        total = [sum(w * per[n][i] for n, w in zip(self.names, self.weights)) for i in range(len(completions))]
        return RewardScores(total=total, per_reward=per)


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) or repr(fn)


def combine(reward_fns: Mapping[str, RewardFunction | str] | Sequence[RewardFunction | str],
            weights: Sequence[float] | None = None) -> CombinedReward:
    """Bundle rewards into one callable returning each reward's scores and their weighted total.

    Args:
        reward_fns: functions or registry names, or a {log name: function or name} mapping.
        weights: one per function; default all 1.0 (R1-Zero's R_acc + R_format, v2 eq. 4).
    """
    items = list(reward_fns.items()) if isinstance(reward_fns, Mapping) else [
        (f if isinstance(f, str) else _name(f), f) for f in reward_fns]
    if not items:
        raise ValueError("combine needs at least one reward function")
    names = tuple(n for n, _ in items)
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {list(names)}; pass a mapping to rename")
    fns = tuple(get_reward(f) if isinstance(f, str) else f for _, f in items)
    weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"got {len(weights)} weights for {len(fns)} reward functions")
    return CombinedReward(names=names, fns=fns, weights=weights)
