"""Where text comes from: input paths (files, folders, globs) and the documents they hold, read in bounded memory.

    resolve_inputs(["data/", "extra/*.jsonl.gz", "notes.txt"]) -> the files, in a fixed order
    DocumentReader(files, field="text", cut=tokenizer.next_cut).pieces() -> (text, ends_document) pairs

Inputs:
    a file          read as itself (below)
    a folder        every file under it, recursively, whose name ends in .txt, .jsonl, .txt.gz or .jsonl.gz
                    (hidden files and folders, whose names start with ".", are skipped), in sorted path order
    a glob pattern  (a path with * ? or [ that does not exist as written) the files it matches, sorted; ** matches
                    folders at any depth; a matched folder is read as a folder
The same file named twice (say, a folder and a file inside it) is read once, where it first appears.

Files:
    NAME.jsonl      one JSON object per line; its `field` (default "text") is one document; blank lines are skipped
    NAME.gz         gunzipped, then read by the rest of its name (x.jsonl.gz as JSON lines, anything else as text)
    anything else   UTF-8 text, the whole file one document, kept as written (no newline translation: a
                    "\\r\\n" stays two characters, so the document's bytes are exactly the file's)

A document longer than `chunk_chars` is handed out in pieces, each cut where the tokenizer's `next_cut` says that
encoding the pieces one by one gives the same tokens as encoding the whole (npllm.tokenizer); a tokenizer that has
no such place (cut is None) gets each document whole.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterator

FOLDER_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")  # what a folder contributes
GLOB_CHARS = "*?["
READ_CHARS = 1 << 20  # a text file is read about 1M characters at a time
PROGRESS_BYTES = 1 << 20  # on_bytes is called about once per MiB read

Cut = Callable[[str, int], int]  # cut(text, pos) -> the first safe cut p >= pos with p < len(text), or -1


def resolve_inputs(inputs) -> list[Path]:
    """The files named by ``inputs`` (files, folders, glob patterns), each once, in order (module docstring).

    ValueError when nothing is given or a folder holds no text files; FileNotFoundError naming a path that does not
    exist or a pattern that matches nothing.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ValueError("no inputs given; pass at least one text or .jsonl file, folder or glob pattern")
    files, seen = [], set()
    for given in inputs:
        for path in _expand(Path(given), str(given)):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _expand(path: Path, given: str) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _folder_files(path)
        if not found:
            raise ValueError(f"input folder {path} holds no text files; a folder contributes the files whose names "
                             f"end in {', '.join(FOLDER_SUFFIXES)}")
        return found
    if path.exists():
        raise ValueError(f"input {path} is neither a file nor a folder")
    if any(c in given for c in GLOB_CHARS):
        matches = sorted(glob.glob(given, recursive=True))
        if not matches:
            raise FileNotFoundError(f"no files match the input pattern {given}")
        out = []
        for m in matches:
            m = Path(m)
            out.extend([m] if m.is_file() else _folder_files(m) if m.is_dir() else [])
        return out
    raise FileNotFoundError(f"input not found: {path} (pass text or .jsonl files, folders or glob patterns)")


def _folder_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # os.walk descends into what is left
        found.extend(Path(root) / n for n in names if not n.startswith(".") and n.endswith(FOLDER_SUFFIXES))
    return sorted(found)


def is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(".jsonl")


def total_bytes(files) -> int:
    """The size on disk of the files (compressed sizes for .gz): what a progress bar counts up to."""
    return sum(Path(f).stat().st_size for f in files)


def split_text(text: str, cut: Cut | None, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """``text`` as (piece, is_last) pairs: pieces of at least chunk_chars characters (except the last), each ending
    at a safe cut; the whole text as one piece when cut is None or finds no place."""
    start = 0
    while cut is not None and len(text) - start > chunk_chars:
        p = cut(text, start + chunk_chars)
        if p < 0:
            break
        yield text[start:p], False
        start = p
    yield text[start:], True


class DocumentReader:
    """Reads the documents of ``files`` in order, as pieces of at most about chunk_chars characters.

    on_bytes(n) is called as the files are read, with the number of bytes read from disk since the last call
    (compressed bytes for .gz), so a progress bar over total_bytes(files) has a meaningful ETA.
    """

    def __init__(self, files, field: str = "text", cut: Cut | None = None, chunk_chars: int = READ_CHARS,
                 on_bytes: Callable[[int], None] | None = None):
        if not isinstance(field, str) or not field:
            raise ValueError(f"field={field!r} is not allowed; use the name of the JSON field that holds the text")
        self.files = [Path(f) for f in files]
        self.field, self.cut, self.chunk_chars = field, cut, int(chunk_chars)
        self.on_bytes = on_bytes or (lambda n: None)

    def pieces(self) -> Iterator[tuple[str, bool]]:
        """(text, ends_document) for every piece of every document, in order."""
        for path in self.files:
            if is_jsonl(path):
                yield from self._jsonl_pieces(path)
            else:
                yield from self._text_pieces(path)

    def _open(self, path: Path):
        """(the file on disk, whose tell() is the bytes read so far; the binary stream of its contents)"""
        raw = open(path, "rb")
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
        return raw, stream

    def _text_pieces(self, path: Path) -> Iterator[tuple[str, bool]]:
        raw, stream = self._open(path)
        reported = 0
        with raw, stream, io.TextIOWrapper(stream, encoding="utf-8", newline="") as text:
            buf, block = "", self.chunk_chars
            while True:
                try:
                    more = text.read(block)
                except UnicodeDecodeError as err:
                    raise ValueError(f"input file {path} is not UTF-8 text: {err}") from None
                except (OSError, EOFError) as err:  # gzip: not a gzip file, or truncated
                    raise ValueError(f"input file {path} cannot be read: {err}") from None
                position = raw.tell()
                self.on_bytes(position - reported)
                reported = position
                if not more:
                    break
                buf += more
                while len(buf) > self.chunk_chars:
                    p = self.cut(buf, self.chunk_chars) if self.cut is not None else -1
                    if p < 0:  # no safe place yet: read as much again (geometric growth keeps copying linear)
                        block = max(self.chunk_chars, len(buf))
                        break
                    yield buf[:p], False
                    buf, block = buf[p:], self.chunk_chars
            yield buf, True

    def _jsonl_pieces(self, path: Path) -> Iterator[tuple[str, bool]]:
        raw, stream = self._open(path)
        reported = 0
        with raw, stream:
            lineno = 0
            while True:
                try:
                    line = stream.readline()
                except (OSError, EOFError) as err:
                    raise ValueError(f"input file {path} cannot be read: {err}") from None
                if not line:
                    break
                lineno += 1
                if raw.tell() - reported >= PROGRESS_BYTES:
                    self.on_bytes(raw.tell() - reported)
                    reported = raw.tell()
                if not line.strip():
                    continue
                yield from split_text(self._record_text(path, lineno, line), self.cut, self.chunk_chars)
            self.on_bytes(raw.tell() - reported)

    def _record_text(self, path: Path, lineno: int, line: bytes) -> str:
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except UnicodeDecodeError as err:
            raise ValueError(f"{where} is not UTF-8: {err}") from None
        except ValueError as err:
            raise ValueError(f"{where} is not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where} is a JSON {type(record).__name__}; each line must be an object with a "
                             f"{self.field!r} field")
        if self.field not in record:
            fields = ", ".join(map(repr, list(record)[:8])) or "none"
            raise ValueError(f"{where} has no {self.field!r} field (its fields: {fields}); pass --field=NAME")
        value = record[self.field]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {self.field!r} is a JSON {type(value).__name__}, not a string")
        return value
