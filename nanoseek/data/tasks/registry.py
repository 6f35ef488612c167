"""The task registry and the three calls the pipeline uses: `generate`, `check`, `TASKS`.

`TASKS` is a read-only mapping (no module-level mutable state); add a task by writing a module
with a `SPEC` and listing it here.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from . import arithmetic, countdown, linear
from .base import Example, TaskSpec, generate_from

TASKS: Mapping[str, TaskSpec] = MappingProxyType({s.name: s for s in (arithmetic.SPEC, countdown.SPEC, linear.SPEC)})


def get_task(name: str) -> TaskSpec:
    """The TaskSpec called `name`; KeyError lists the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


def generate(task: str, split: str, n: int, difficulty: int | None = None, seed: int = 0) -> list[Example]:
    """`n` distinct examples of `task` from `split` ("train" or "test").

    Deterministic in (task, split, n, difficulty, seed); a larger n extends a smaller one's list.
    difficulty=None draws each example's level uniformly from the task's levels. No problem can
    appear in both splits (see base.split_of); within one call no problem repeats.
    """
    return generate_from(get_task(task), split, n, difficulty, seed)


def check(example: Example | Mapping[str, Any], predicted: str) -> bool:
    """Whether `predicted` (the text inside <answer>...</answer>) solves `example`.

    Accepts an Example or its `to_dict()` form; never raises on bad model output (returns False).
    """
    ex = example if isinstance(example, Example) else Example.from_dict(example)
    if not isinstance(predicted, str):
        return False
    return bool(get_task(ex.task).check(ex, predicted))
