"""Atomic file writes: a reader (or a crash) never sees a half-written output."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path``; it replaces ``path`` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should get the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding, newline=None if "b" in mode else "\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime in ns): what identifies a file's content cheaply for the caches; a replaced file gets a new one."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes: identifies content whatever its mtime (a regenerated, identical file matches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_key(prefix: str, folder: str | os.PathLike, *setting: str) -> str:
    """``<prefix>_<folder name>_<12 hex>``: a file-system-safe name for what the caches keep per folder (its absolute
    path) and setting, readable by its folder name."""
    digest = hashlib.sha256("\n".join([os.path.abspath(folder), *setting]).encode()).hexdigest()[:12]
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(folder).resolve().name) or "root"
    return f"{prefix}_{name}_{digest}"


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Any) -> int:
    """Write one JSON object per line; returns the number of lines."""
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
