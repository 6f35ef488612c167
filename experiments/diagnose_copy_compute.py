"""Can a pretrained model read its question, and can it compute? Teacher-forced NLL per digit (nats).

For held-out R1-format documents of the built-in tasks (difficulty 1), the model's mean negative
log-likelihood of
- copy digits: the digits of arithmetic's closing "So <expression> = ..." line, which repeats the
  question: a model that reads its question gets them nearly free (uniform guessing: ln 10 = 2.3);
- result digits: the digits of every intermediate result "... = <number>" in the worked solution,
  which the model has to compute.
docs/r1_report.md uses it to follow what pretraining teaches (and what a tokenizer change did).

    python experiments/diagnose_copy_compute.py runs/r1/pretrain/checkpoints/step-001400 [more checkpoints]
"""

from __future__ import annotations

import argparse
import re
import statistics

import torch
import torch.nn.functional as F

from nanoseek import from_pretrained
from nanoseek.data import Tokenizer, r1_document
from nanoseek.rl.data import task_examples


def digit_nll(model, tok, doc: str, spans: list[tuple[int, int]]) -> list[float]:
    """Mean NLL of the tokens that overlap each character span of `doc` (the document is fed after BOS).

    Tokens are found by their character offsets, so a token that also holds the space before a
    number (" 1" of " 13") counts as the number's first digit whatever the tokenizer.
    """
    enc = tok.backend.encode(doc, add_special_tokens=False)
    ids = torch.tensor([[tok.bos_id, *enc.ids]])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    out = []
    for start, end in spans:  # logp[i] scores document token i (input position i holds its predecessor)
        hit = [i for i, (a, b) in enumerate(enc.offsets) if a < end and b > start]
        out.append(-logp[hit].mean().item())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="checkpoint folders with tokenizer.json")
    p.add_argument("--n", type=int, default=30, help="held-out problems per task (default: 30)")
    args = p.parse_args()
    for path in args.models:
        tok, model = Tokenizer.load(path), from_pretrained(path).eval()
        copy, result = [], {"arithmetic": [], "linear": []}
        for task in result:
            for ex in task_examples([task], "test", args.n, difficulty=1):
                doc = r1_document(ex)
                think = doc.index("<think>")
                spans = [m.span(1) for m in re.finditer(r"= (-?\d+)", doc[think:])]
                result[task] += digit_nll(model, tok, doc, [(think + a, think + b) for a, b in spans])
                if task == "arithmetic":
                    so = doc.rindex("\nSo ") + 4
                    copy += digit_nll(model, tok, doc, [(m.start() + so, m.end() + so)
                                                        for m in re.finditer(r"\d+", doc[so:doc.index(" =", so)])])
        print(f"{path}: copy digits {statistics.fmean(copy):.2f} nats; result digits arithmetic "
              f"{statistics.fmean(result['arithmetic']):.2f}, linear {statistics.fmean(result['linear']):.2f} "
              f"(uniform guess: ln 10 = 2.30)")


if __name__ == "__main__":
    main()
