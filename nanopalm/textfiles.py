"""Users' text files, checked before anything reads them: UTF-8, JSON lines of documents, not empty. The
libraries that read them later (datasets, a tokenizer) fail without naming the file, the line or the byte.
Used by data preparation (prepare.py) and by eval.py's --data_files (evaluate.py)."""

from __future__ import annotations

import codecs
import json

from nanopalm.errors import UserError

COMPRESSION = (".gz", ".bz2", ".xz", ".zst")  # datasets decompresses these transparently: left to it here


def check_text_files(files: list[str], builder: str, column: str) -> None:
    """Before `datasets` reads them (its errors name neither file nor line): each file is UTF-8 text, each JSON
    line an object whose `column` is a string, and the files hold some text. Compressed files are left to it."""
    plain = [path for path in files if not path.endswith(COMPRESSION)]
    has_text = len(plain) < len(files)
    for path in plain:
        has_text |= check_utf8(path)
        if builder == "json":
            check_json_lines(path, column)
    if not has_text:
        raise UserError(f"--data_files {' '.join(files)}: {'the files are' if len(files) > 1 else 'the file is'} "
                        "empty (or only whitespace): nothing to prepare")


def check_utf8(path: str) -> bool:
    """Name the first byte of `path` that is not UTF-8; returns whether it holds anything but whitespace."""
    decoder, offset, has_text = codecs.getincrementaldecoder("utf-8")(), 0, False
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                pending = len(decoder.getstate()[0])  # the start of a character cut by the previous chunk
                try:
                    has_text |= bool(decoder.decode(chunk).strip())
                except UnicodeDecodeError as e:
                    where = offset + e.start - pending
                    raise UserError(f"{path} is not UTF-8 text (byte {where}: {e.reason}): convert it first, "
                                    f"e.g. iconv -f latin1 -t utf-8 {path} > {path}.utf8") from None
                offset += len(chunk)
    except OSError as e:
        raise UserError(f"cannot read --data_files {path} ({e.strerror}): check the path and its "
                        "permissions") from None
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (it ends inside a character: {e.reason}): convert it "
                        "to UTF-8 first") from None
    return has_text


JSON_TYPES = {int: "number", float: "number", bool: "boolean", list: "array", dict: "object", type(None): "null"}


def check_json_lines(path: str, column: str) -> None:
    """Every line of a JSON-lines file is an object with a string `column`; the first that is not is named by
    file and line. (A .json file holding one array is left to `datasets`.)"""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if number == 1 and line.lstrip().startswith("["):
                return
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number} is not valid JSON ({e.msg}, column {e.colno}): fix or "
                                "remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number} is a JSON {JSON_TYPES[type(row)]}, not an object: each line "
                                f"must be one document, {{\"{column}\": \"...\"}}")
            if column not in row:
                raise UserError(f"{path} line {number} has no {column!r} key (it has {', '.join(row) or 'none'}): "
                                f"give every line one, or set --text_column")
            if not isinstance(row[column], str):
                raise UserError(f"{path} line {number}: {column!r} is a JSON {JSON_TYPES[type(row[column])]}, not a "
                                "string: each document's text must be a string")
