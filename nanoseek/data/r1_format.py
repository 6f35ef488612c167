"""Text in the DeepSeek-R1 format: a reasoning block in <think>, the final answer in <answer>.

Two views of the same example:
- R1-Zero template (R1 paper, Table 1; docs/design/grpo_sources.md): a plain-text, content-free instruction,
  then "User: {question} Assistant: ", no chat tokens. Used for pretraining documents and GRPO
  prompts on a base model.
- chat messages (`r1_messages`) for the tokenizer's chat template, for SFT cold start.

The completion is always `<think>\n{solution}\n</think>\n<answer>{answer}</answer>`. The prompt ends
with "Assistant: " so the prompt/completion border falls right before the `<think>` token:
`encode(prompt) + encode(completion) == encode(prompt + completion)` because the tokenizer splits
added tokens before anything else.
"""

from __future__ import annotations

import re

from .tasks.base import Example

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question} Assistant: ")

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def r1_prompt(question: str | Example) -> str:
    """The R1-Zero prompt for a question (or an Example's question), ending in "Assistant: "."""
    q = question.question if isinstance(question, Example) else question
    return R1_ZERO_TEMPLATE.format(question=q)


def r1_completion(example: Example) -> str:
    """The target completion: worked solution in <think>, canonical answer in <answer>."""
    return f"{THINK}\n{example.solution}\n{END_THINK}\n{ANSWER}{example.answer}{END_ANSWER}"


def r1_document(example: Example) -> str:
    """Prompt followed by completion: one pretraining document."""
    return r1_prompt(example) + r1_completion(example)


def r1_messages(example: Example, system: str | None = None) -> list[dict[str, str]]:
    """[system?], user question, assistant completion: input for Tokenizer.apply_chat_template."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": example.question},
                   {"role": "assistant", "content": r1_completion(example)}]


def extract_answer(completion: str) -> str | None:
    """The text of the last <answer>...</answer> block (stripped), or None when there is none."""
    found = _ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def format_ok(completion: str) -> bool:
    """Exactly one think block followed by exactly one answer block, nothing else around them."""
    m = _FORMAT_RE.fullmatch(completion)
    return bool(m) and all(completion.count(t) == 1 for t in (THINK, END_THINK, ANSWER, END_ANSWER))
