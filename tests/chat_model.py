"""A tiny chat model with known greedy outputs, shared by the server and CLI tests: the tiny preset
fitted to one R1-style chat transcript (with a <think> block) and one repeated sentence."""

from __future__ import annotations

import torch

import nanoseek
from nanoseek.data import default_corpus, train_tokenizer

QUESTION = "What is 2+2?"
REASONING, ANSWER = "\nadd two and two\n", "\n<answer>4</answer>"
SENTENCE = "The quick brown fox jumps over the lazy dog. "


def train_tiny(tok, steps: int = 80) -> nanoseek.Transformer:
    torch.manual_seed(0)
    model = nanoseek.build_model(nanoseek.ModelConfig.preset("tiny", vocab_size=tok.vocab_size), seed=0)
    chat = tok.apply_chat_template([{"role": "user", "content": QUESTION},
                                    {"role": "assistant", "content": f"<think>{REASONING}</think>{ANSWER}"}],
                                   add_generation_prompt=False)
    docs = [torch.tensor(tok.encode(t)) for t in (chat, SENTENCE * 3)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = sum(torch.nn.functional.cross_entropy(model(x[None, :-1])[0], x[1:]) for x in docs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_chat_model(d) -> str:
    """Train the tokenizer and the model and save both into folder `d`."""
    tok = train_tokenizer(default_corpus(200), vocab_size=512)
    nanoseek.save_pretrained(train_tiny(tok), d)
    tok.save(d)
    return str(d)
