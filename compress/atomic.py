"""Writing a directory all at once: into a temporary sibling, renamed into place when complete."""
from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; when the block ends normally it replaces
    ``out`` (an existing one is renamed aside first and deleted after), and on any error it is
    deleted, so a reader never sees a half-written ``out``. Callers decide whether replacing an
    existing ``out`` is allowed before entering.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str, overwrite: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary sibling renamed into place.

    Refuses an existing ``path`` unless ``overwrite``, and a ``path`` that is a directory always.
    """
    from .errors import CompressError

    if path.is_dir():
        raise CompressError(f"{path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise CompressError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with open(fd, "w") as f:
            f.write(text)
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
