"""Files on disk: atomic writes, and reads whose errors name the file.

Everything is written to `<path>.tmp` next to its destination and moved over it with `os.replace`,
which is atomic on POSIX and Windows when both are on the same file system, so a reader (or a crash)
never sees a half-written file.

Text is read as strict UTF-8, as `datasets`' text and json loaders do by default: a binary file or
text in another encoding fails with the file, the byte and its offset instead of being decoded into
replacement characters that a model would then learn. JSON errors name the file and the line.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable


def atomic(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then move the finished file to `path`."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """`text` (UTF-8) at `path`, written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic(path, write)


def decode_utf8(data: bytes, where: str, error: type[Exception] = ValueError) -> str:
    """`data` as UTF-8 text; `error` naming `where` (a file, or file:line) for anything else.

    NUL bytes are refused too: valid UTF-8, but in a text corpus they mean a binary file or UTF-16 text.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): a binary "
                         "file, or text in another encoding such as Latin-1 (convert it to UTF-8, e.g. "
                         "iconv -f latin1 -t utf-8)") from None
    if "\x00" in text:
        raise error(f"{where}: contains NUL bytes (offset {text.index(chr(0))}): a binary file or UTF-16 "
                         "text, not UTF-8 text")
    return text


def read_text(path: str | os.PathLike, error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of file `path`, line ends translated to "\\n" as open(path, encoding="utf-8").read() does;
    `error` naming the file otherwise (see decode_utf8)."""
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), os.fspath(path), error)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError, expect: type | None = dict) -> Any:
    """The JSON value in file `path`, which must be an `expect` (None: any value).

    Invalid UTF-8, invalid JSON or a value of another type raise `error` naming the file (and the line).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        value = json.loads(decode_utf8(data, path, error))
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {_JSON_TYPES.get(expect, expect.__name__)}, "
                    f"got {_JSON_TYPES.get(type(value), type(value).__name__)}")
    return value


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}
