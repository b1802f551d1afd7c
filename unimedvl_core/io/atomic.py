"""Files appear whole or not at all: every writer writes to a hidden temporary name beside the target and
renames it into place, so an interrupted run (Ctrl-C, a crash, a full disk) leaves no partial file."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed to ``path`` (an atomic
    replace on POSIX and Windows), on any exception or interrupt it is removed. The temporary name keeps the
    target's suffixes so that libraries choosing a format by extension (``.nii.gz``) still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    # a fresh name the writer creates itself, so the file gets the usual permissions (umask)
    temporary = path.parent / f".{path.stem[:40]}.{os.getpid()}.{secrets.token_hex(4)}.part{suffix}"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)
