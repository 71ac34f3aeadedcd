"""Atomic file writes: every file ofstitch writes goes through here.

A file is written under a temporary name in its final folder and renamed into
place, so an interrupted run leaves the old file or the new one, never half of
one. The new file gets the usual permissions (``0666`` less the umask).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

NAME_MAX = 255  # bytes in a file name on the usual file systems (ext4, NTFS, APFS)
TEMP_EXTRA = 24  # bytes a temporary name adds: the dot, the random part, ".tmp"


def shorten_name(name: str, max_bytes: int) -> str:
    """``name`` cut to at most ``max_bytes`` bytes (as the file system stores it), never
    in the middle of a character."""
    data = os.fsencode(name)
    if len(data) <= max_bytes:
        return name
    return data[:max(max_bytes, 1)].decode("utf-8", "ignore") or "ofstitch"


def temp_stem(stem: str, suffix: str = "") -> str:
    """``stem`` shortened so that a temporary name made from it (``.STEM.XXXXXXXX.tmpSUFFIX``)
    stays within :data:`NAME_MAX` bytes."""
    return shorten_name(stem, NAME_MAX - TEMP_EXTRA - len(os.fsencode(suffix)))


def umask() -> int:
    """The process's umask (read without changing it for good)."""
    try:  # Linux: read it without setting it, which other threads could see
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same suffix); rename it into place on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{temp_stem(path.stem, path.suffix)}.",
                               suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed to ``path`` on success (replacing an
    older one). It gets the usual permissions (``0777`` less the umask)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 700 would keep other users out
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_text(path: Path | str, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))
