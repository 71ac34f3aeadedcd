"""Atomic file writes: every file ofstitch writes goes through here.

A file is written under a temporary name in its final folder and renamed into
place, so an interrupted run leaves the old file or the new one, never half of
one. The new file gets the usual permissions (``0666`` less the umask).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from .errors import OfstitchError

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


_EDQUOT = getattr(errno, "EDQUOT", errno.ENOSPC)  # no quotas on Windows
WRITE_ERRNOS = {errno.ENOSPC, _EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
LOW_SPACE_BYTES = 8 << 20  # a writer that fails with less than this free ran out of space


class OutputWriteError(OfstitchError, OSError):
    """An output could not be written: a full disk, a quota, a read-only or forbidden
    folder. The message names the file and what to do. It is an ``OSError`` too, so code
    that copes with a failed write (the cache) goes on coping."""


def _size(path: str | Path) -> int:
    total = 0
    for root, _, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def write_problem(exc: BaseException, path: Path, tmp: str | Path) -> OutputWriteError | None:
    """The user-facing error for a failed write of ``path`` (through ``tmp``), or ``None``
    when ``exc`` is not about the disk (a bug, a bad tile: raised as it is).

    libvips reports a full disk as "unable to call jpegsave" with no error number, so a
    writer's error counts as a full disk when the folder has almost no space left.
    """
    if isinstance(exc, OutputWriteError):
        return exc
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    written = _size(tmp) / 1e6
    code = getattr(exc, "errno", None)
    full = code in (errno.ENOSPC, _EDQUOT) or (
        free is not None and free < LOW_SPACE_BYTES
        and (isinstance(exc, OSError) or type(exc).__module__.startswith("pyvips")))
    if full:
        have = f"{free / 1e6:.1f} MB free" if free is not None else "no space left"
        return OutputWriteError(
            f"cannot write {path}: the disk is full ({have}; it had written "
            f"{written:.1f} MB of it): free some space or choose another folder with "
            "-o/--output-dir")
    if code in WRITE_ERRNOS:
        return OutputWriteError(f"cannot write {path} ({os.strerror(code)}): choose another "
                                "folder with -o/--output-dir")
    return None


def _reraise(exc: Exception, path: Path, tmp: str | Path) -> NoReturn:
    """Raise ``exc``, as :class:`OutputWriteError` when it is about the disk."""
    problem = write_problem(exc, path, tmp)
    if problem is not None and problem is not exc:
        raise problem from None
    raise exc


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same suffix); rename it into place on success.

    A write that fails for lack of space or permission raises :class:`OutputWriteError`;
    the temporary file is removed whatever happens.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{temp_stem(path.stem, path.suffix)}.",
                               suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except Exception as exc:
        _reraise(exc, path, tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed to ``path`` on success (replacing an
    older one). It gets the usual permissions (``0777`` less the umask)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{temp_stem(path.name)}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 700 would keep other users out
    try:
        yield tmp
        _swap_in(tmp, path)
    except Exception as exc:
        _reraise(exc, path, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, path: Path, tries: int = 20) -> None:
    """Rename the folder ``new`` to ``path``, replacing an older one. Two runs doing this at
    once both succeed (the last one wins): the old folder is renamed aside, never deleted
    in place, and a rename that loses the race is tried again."""
    for _ in range(tries):
        old = None
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{temp_stem(path.name)}.old.{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, old)
            except FileNotFoundError:  # another run moved it first
                old = None
        try:
            os.rename(new, path)
        except OSError:  # another run put its folder there in between: again
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise OutputWriteError(f"cannot replace {path}: other runs keep writing it")


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_text(path: Path | str, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


STAGE_PREFIX = ".ofstitch-outputs."  # + the writing process's id + a random part


@contextlib.contextmanager
def output_set(folder: Path | str) -> Iterator[Path]:
    """A hidden folder inside ``folder`` for one run's outputs, moved into ``folder``
    together when the run succeeds and removed when it fails, so that a failed run (a
    full disk, an interruption) leaves the outputs of the last good run as they were,
    never a mix of both. Leftovers of runs that were killed are removed first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(folder)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}.", dir=folder))
    os.chmod(stage, 0o777 & ~umask())
    try:
        yield stage
        for entry in sorted(stage.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                _swap_in(entry, folder / entry.name)
            else:
                os.replace(entry, folder / entry.name)
    except Exception as exc:
        _reraise(exc, folder, stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale_stages(folder: Path) -> None:
    """Remove the output folders (:func:`output_set`) of runs whose process is gone."""
    if os.name != "posix":  # no cheap check that a process is alive
        return
    for entry in Path(folder).glob(f"{STAGE_PREFIX}*"):
        try:
            pid = int(entry.name[len(STAGE_PREFIX):].split(".", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue  # not ours, or another user's live run
