"""Writing outputs all at once: into a temporary sibling, renamed into place when complete.

Whatever ends the write early (an error, a full disk, Ctrl-C, SIGTERM raised as
``errors.Interrupted`` by the CLI) removes the temporary sibling, so a reader never sees a
half-written output and no hidden ``.NAME.tmp-*`` is left behind. A full disk (ENOSPC, or EDQUOT
for a quota) becomes one ``DiskFullError`` naming the output, the bytes needed and the bytes free.

Tests set ``COMPRESS_TEST_PAUSE_WRITE`` to a number of seconds to pause once the temporary output
is complete and before it is renamed, so that a signal can be sent mid-write.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CompressError, DiskFullError

PAUSE_ENV = "COMPRESS_TEST_PAUSE_WRITE"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def check_output_dir(out: Path, overwrite: bool, marker: str | None = None) -> None:
    """CompressError unless ``out`` may be written as a directory.

    Allowed: ``out`` absent, or (with ``overwrite``) an existing directory that holds ``marker``
    when one is given (a directory the same writer made). Refused, whatever ``overwrite`` says: a
    regular file (it is never replaced by a directory: the user may have mistyped a path), the
    current directory or one above it, and a directory without ``marker``.
    """
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise CompressError(f"output {out} is a file, not a directory: the output is a directory and a "
                            "file is never replaced by one; remove it or choose another output path")
    if not overwrite:
        raise CompressError(f"output directory {out} exists; pass --overwrite to replace it")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise CompressError(f"output {out} is the current directory or one above it; not replacing it")
    if marker is not None and not (out / marker).is_file():
        raise CompressError(f"output directory {out} has no {marker}, so compress did not write it; "
                            "not replacing it (remove it yourself or choose another output path)")


@contextmanager
def atomic_directory(out: Path, marker: str | None = None, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; when the block ends normally it replaces
    ``out`` (an existing one is renamed aside first and deleted after), and on any error or
    interrupt it is deleted and ``out`` is left as it was.

    Callers decide whether replacing an existing ``out`` is allowed before entering (see
    ``check_output_dir``, whose refusals of a file, of the current directory and, with ``marker``,
    of a directory without that file apply here too). expected_bytes: the output's size when the
    caller knows it, quoted when the disk fills.
    """
    out = Path(out)
    check_output_dir(out, overwrite=True, marker=marker)
    tmp = old = None
    free = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        _pause_for_tests()
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex}")
            out.rename(old)
        tmp.rename(out)
        tmp = None
    except BaseException as exc:
        written = _tree_bytes(tmp) if tmp is not None else 0
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not (out.exists() or out.is_symlink()):
            old.rename(out)  # interrupted between the two renames: put the old output back
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise DiskFullError(_disk_full_message(out, expected_bytes, written, free)) from None
        raise
    if old is not None:
        try:
            _remove(old)
        except BaseException:
            _remove(old, ignore_errors=True)  # a second try, e.g. after Ctrl-C during the first
            raise


def atomic_write_text(path: Path, text: str, overwrite: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary sibling renamed into place.

    Refuses an existing ``path`` unless ``overwrite``, and a ``path`` that is a directory always.
    """
    path = Path(path)
    if path.is_dir():
        raise CompressError(f"{path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise CompressError(f"{path} exists; pass --overwrite to replace it")
    data = text.encode()
    tmp = None
    free = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        tmp = Path(name)
        with open(fd, "wb") as f:
            f.write(data)
        tmp.chmod(0o644)
        _pause_for_tests()
        tmp.replace(path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise DiskFullError(_disk_full_message(path, len(data), 0, free)) from None
        raise


def _disk_full_message(out: Path, expected: int | None, written: int, free: int | None) -> str:
    need = f"needs {expected:,} bytes" if expected else f"needs more than the {written:,} bytes it had written"
    had = f", {free:,} bytes were free" if free is not None else ""
    return (f"no space left on device writing {out}: it {need}{had}; the partial output was removed "
            "and nothing was replaced")


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (0 if it is gone)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += (Path(dirpath) / name).stat().st_size
            except OSError:
                pass
    return total


def _remove(path: Path, ignore_errors: bool = False) -> None:
    """Remove a directory tree, or a file or link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            if not ignore_errors:
                raise


def _pause_for_tests() -> None:
    """Sleep COMPRESS_TEST_PAUSE_WRITE seconds (unset: none) with the temporary output complete."""
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))
