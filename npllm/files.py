"""Durable file writes: the one atomic-write helper, fsync by path, and a file's sha256.

Every file npllm writes for a user (checkpoint tensors and metadata, the ``latest`` pointer, tokenizers, token
shards, metrics, the loss plot) goes through ``atomic_write``: a reader sees the old file or the whole new one,
never half of it, and a crash right after the call cannot lose the new contents.

    1. write into a temp file beside the target (same directory, so the rename below never crosses filesystems)
    2. flush and fsync the temp file            its bytes are on disk
    3. os.replace(temp, target)                 one rename(2): the name points at the old file or the new one
    4. fsync the directory                      the rename itself is on disk

If anything fails before step 3 the temp file is removed and the target is untouched.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable, Union

HASH_BLOCK = 1 << 24  # files are hashed 16 MiB at a time, so a 28 GB file needs no 28 GB buffer

Content = Union[bytes, bytearray, memoryview, str, Iterable, Callable[[Path], None]]


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for writing it atomically: ``.NAME.PID.RANDOM.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_path(path) -> None:
    """fsync a file or a directory by path (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, content: Content) -> Path:
    """Replace ``path`` with ``content`` atomically and durably (the module docstring's four steps).

    content: bytes (or any bytes-like), a str (written as UTF-8), an iterable of bytes-like parts written one after
    the other (a header and a large array need not be joined in memory), or a function ``write(temp_path)`` that
    writes the file itself (for libraries that only write to a path: safetensors, matplotlib).
    Returns ``path`` as a Path.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        if callable(content):
            content(tmp)
            fsync_path(tmp)
        else:
            parts = [content.encode("utf-8")] if isinstance(content, str) else (
                [content] if isinstance(content, (bytes, bytearray, memoryview)) else content)
            with open(tmp, "xb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
