"""Data layer: verifiable tasks, R1-format text, a byte-level BPE tokenizer, packed training data.

- tasks/: seeded task generators with worked solutions and checkers (arithmetic, countdown, linear).
- r1_format.py: R1-Zero prompt, <think>/<answer> completion, answer extraction.
- tokenizer.py: train/save/load a byte-level BPE tokenizer that transformers.AutoTokenizer reads.
- corpus.py: the built-in pretraining corpus (task documents plus a little natural text).
- sources.py: read .txt/.md, .jsonl and .parquet documents from disk.
- dataset.py: pack documents into rows with per-document positions; resumable batch iterator.
"""

from .corpus import default_corpus, natural_paragraphs
from .dataset import (IGNORE_INDEX, Batch, BatchIterator, PackedDataset, build_datasets, collate,
                      document_causal_mask, eval_batches, split_documents, tokenize_documents)
from .r1_format import extract_answer, format_ok, r1_completion, r1_document, r1_messages, r1_prompt
from .sources import load_documents
from .tasks import TASKS, Example, check, countdown_check, generate
from .tokenizer import Tokenizer, train_tokenizer

__all__ = ["IGNORE_INDEX", "TASKS", "Batch", "BatchIterator", "Example", "PackedDataset", "Tokenizer",
           "build_datasets", "check", "collate", "countdown_check", "default_corpus", "document_causal_mask",
           "eval_batches", "extract_answer", "format_ok", "generate", "load_documents", "natural_paragraphs",
           "r1_completion", "r1_document", "r1_messages", "r1_prompt", "split_documents", "tokenize_documents",
           "train_tokenizer"]
