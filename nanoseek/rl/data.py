"""Post-training data: problems with verifiable answers, prompts for them, and SFT rows on disk.

Problems come from the built-in task generators (`task_examples`: Example objects that know their
checker) or from the user's local jsonl/parquet files (`load_problems`: dicts with "question" and
"answer", GSM8K or MATH style, checked with math-verify by nanoseek.rl.rewards).

Prompts have two templates (`TEMPLATES`):
- "r1_zero": the R1-Zero plain-text instruction ending in "Assistant: " (R1 Table 1), after BOS; the
  template a base model was pretrained on (nanoseek.data.corpus writes its documents that way).
- "chat": the tokenizer's chat template, `BOS <|User|>question<|Assistant|>`; what SFT teaches.

SFT rows (jsonl, one object per line) are either {"messages": [..., {"role": "assistant", ...}]}
(the last message is the completion, the rest go through the chat template) or {"prompt": str,
"completion": str} (raw text, the prompt after BOS). Extra keys (task, answer, ...) ride along.

Rows are validated when read, so a bad row fails before any training with its file and row number:
an SFT message role other than system/user/assistant (the roles the chat template renders), a problem
row of a built-in task whose "meta" its checker cannot use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from ..data.r1_format import r1_messages, r1_prompt
from ..data.sources import iter_jsonl
from ..data.tasks import TASKS, Example, generate
from ..data.tasks.registry import get_task

TEMPLATES = ("chat", "r1_zero")
ROLES = ("system", "user", "assistant")
Problem = Union[Example, Mapping[str, Any]]


def question_of(problem: Problem) -> str:
    return problem.question if isinstance(problem, Example) else str(problem["question"])


def task_of(problem: Problem) -> str:
    """The task name used to group metrics: the built-in task, the row's "task", else "data"."""
    if isinstance(problem, Example):
        return problem.task
    return str(problem.get("task", "data"))


def prompt_text(problem: Problem | str, tokenizer, template: str = "chat") -> str:
    """The prompt for a problem (or a bare question) as text, BOS included."""
    question = problem if isinstance(problem, str) else question_of(problem)
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    if template == "r1_zero":
        return tokenizer.decode([tokenizer.bos_id]) + r1_prompt(question)
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def prompt_ids(problem: Problem | str, tokenizer, template: str = "chat") -> list[int]:
    """Token ids of `prompt_text` (the BOS string encodes to the BOS id)."""
    return tokenizer.encode(prompt_text(problem, tokenizer, template))


def task_examples(tasks: Sequence[str], split: str, n_per_task: int, difficulty: int | None = None,
                  seed: int = 0) -> list[Example]:
    """`n_per_task` problems of each built-in task from `split`, tasks interleaved (a, b, c, a, b, c, ...).

    Interleaving keeps every prefix of the list balanced over tasks, so a trainer that walks it in
    order sees all tasks from the first step.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    per_task = [generate(t, split, n_per_task, difficulty=difficulty, seed=seed) for t in tasks]
    return [ex for group in zip(*per_task) for ex in group]


def cold_start_rows(examples: Sequence[Example]) -> list[dict]:
    """SFT rows in chat form whose completions are the task solvers' worked R1-format solutions."""
    return [{"messages": r1_messages(ex), "task": ex.task, "answer": ex.answer}
            for ex in examples]


# ---- files ----------------------------------------------------------------------------------------

def read_rows(path: str | os.PathLike) -> list[dict]:
    """Every row of a .jsonl or .parquet file as a dict; errors name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {file}")
    if file.suffix == ".parquet":
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {file} needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(file).to_pylist()
        except pyarrow.ArrowException as e:  # its message never names the file
            raise ValueError(f"{file}: not a readable parquet file ({e})") from None
    if file.suffix != ".jsonl":
        raise ValueError(f"{file}: expected a .jsonl or .parquet file")
    rows = []
    for lineno, row in iter_jsonl(file):
        if not isinstance(row, dict):
            raise ValueError(f"{file}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping]) -> None:
    """Write rows as jsonl atomically (a temp file renamed over the target: never a half-written file)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_problems(path: str | os.PathLike, question_field: str = "question",
                  answer_field: str = "answer") -> list[dict]:
    """Problems from the user's jsonl/parquet file: {"question", "answer", ...other columns}.

    A row written by `Example.to_dict` (it has "task" and "meta" of a built-in task) becomes an
    Example again, so its programmatic checker is used.
    """
    problems = []
    for i, row in enumerate(read_rows(path), 1):
        if row.get("task") in TASKS and "meta" in row:
            problems.append(_task_example(row, path, i))
            continue
        missing = [f for f in (question_field, answer_field) if not isinstance(row.get(f), (str, int, float))]
        if missing:
            raise ValueError(f"{path}: row {i} lacks the field(s) {missing} (question_field={question_field!r}, "
                             f"answer_field={answer_field!r})")
        problems.append({**row, "question": str(row[question_field]), "answer": str(row[answer_field])})
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def _task_example(row: Mapping, path, i: int) -> Example:
    """A row written by Example.to_dict, checked by running its task's checker on its own answer (which reads
    every "meta" key the checker needs), so a malformed row fails here, not in the middle of a GRPO step."""
    fields = ("question", "answer", "solution", "difficulty")
    missing = [f for f in fields if f not in row]
    if missing or not isinstance(row["meta"], dict):
        raise ValueError(f"{path}: row {i} (task {row['task']!r}) needs the fields {list(fields)} and a \"meta\" "
                         f"object" + (f"; missing {missing}" if missing else f"; meta is {type(row['meta']).__name__}"))
    try:
        example = Example.from_dict({k: row[k] for k in ("task", "meta", *fields)})
        spec = get_task(example.task)
        spec.key(example)
        spec.check(example, str(example.answer))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ValueError(f"{path}: row {i} (task {row['task']!r}): its \"meta\" does not fit the task's checker "
                         f"({type(e).__name__}: {e})") from None
    return example


def load_sft_rows(path: str | os.PathLike) -> list[dict]:
    """SFT rows from jsonl/parquet, validated: each has "messages" ending in an assistant turn, or
    "prompt" and "completion" strings."""
    rows = read_rows(path)
    for i, row in enumerate(rows, 1):
        msgs = row.get("messages")
        if msgs is not None:
            ok = (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                           for m in msgs) and msgs[-1].get("role") == "assistant")
            if not ok:
                raise ValueError(f"{path}: row {i}: 'messages' must be a list of {{role, content}} ending with "
                                 "an assistant message")
            roles = [m.get("role") for m in msgs]
            bad = next((j for j, r in enumerate(roles) if r not in ROLES), None)
            if bad is not None:
                raise ValueError(f"{path}: row {i}: message {bad} has role {roles[bad]!r}; expected one of {ROLES}")
        elif not (isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)):
            raise ValueError(f"{path}: row {i} needs 'messages' or 'prompt' and 'completion' strings")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
