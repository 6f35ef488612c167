"""Read the user's own text from local files into a list of documents (no network, no streaming).

Formats, chosen by suffix:
- `.txt` / `.md`: `txt_split="file"` (default) makes each file one document; `txt_split="blank_line"`
  makes every block separated by one or more blank lines a document (for files of short pieces).
- `.jsonl`: one JSON object per line, the document is its `text_field` (default "text").
- `.parquet`: the `text_field` column (needs pyarrow, imported only when a parquet file is read).
Directories are searched recursively for those suffixes in sorted order, so the document order (and
everything seeded downstream) does not depend on the file system. Whitespace-only documents are
dropped; everything else is kept as is (blank_line blocks lose only the blank lines between them).
Text is strict UTF-8 (nanoseek/files.py): a binary file or another encoding is an error naming the
file (and the jsonl line), never replacement characters in the training data.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

from ..files import decode_utf8, read_text

PathLike = Union[str, os.PathLike]
TEXT_SUFFIXES, JSONL_SUFFIXES, PARQUET_SUFFIXES = (".txt", ".md"), (".jsonl",), (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
TXT_SPLITS = ("file", "blank_line")
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # one or more whole blank lines


def load_documents(paths: PathLike | Sequence[PathLike], text_field: str = "text",
                   txt_split: str = "file") -> list[str]:
    """All documents in `paths` (files and/or directories), in a deterministic order.

    Raises FileNotFoundError for a missing path, ValueError for an unsupported suffix, a bad
    `txt_split`, a file that is not UTF-8 text, a jsonl line that is not an object with a string
    `text_field`, or a parquet file without that column.
    """
    if txt_split not in TXT_SPLITS:
        raise ValueError(f"txt_split must be one of {TXT_SPLITS}, got {txt_split!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs: list[str] = []
    for file in _files(paths):
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            text = read_text(file)
            docs += [text] if txt_split == "file" else _BLANK_LINES.split(text)
        elif suffix in JSONL_SUFFIXES:
            docs += _read_jsonl(file, text_field)
        else:
            docs += _read_parquet(file, text_field)
    return [d for d in docs if d.strip()]


def _files(paths: Sequence[PathLike]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{p}: unsupported file type {p.suffix!r}; expected one of {SUFFIXES}")
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return out


def iter_jsonl(file: PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a .jsonl file; ValueError names the
    file and line of invalid JSON or of bytes that are not UTF-8."""
    with open(file, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = decode_utf8(raw, f"{file}:{n}")
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{n}: not valid JSON ({err.msg})") from None


def _read_jsonl(file: Path, field: str) -> list[str]:
    docs = []
    for n, obj in iter_jsonl(file):
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ValueError(f"{file}:{n}: expected an object with a string field {field!r}")
        docs.append(obj[field])
    return docs


def _read_parquet(file: Path, field: str) -> list[str]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {file} needs pyarrow: pip install pyarrow") from None
    try:
        schema = pq.read_schema(file)
        if field not in schema.names:
            raise ValueError(f"{file}: no column {field!r} (columns: {schema.names})")
        return [t for t in pq.read_table(file, columns=[field]).column(field).to_pylist() if t is not None]
    except pyarrow.ArrowException as e:  # its message never names the file
        raise ValueError(f"{file}: not a readable parquet file ({e})") from None
