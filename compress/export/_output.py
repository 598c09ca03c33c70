"""Output files of the exporters: refuse what should not be replaced, write under a temporary name
beside the target, and rename into place only once everything is written (and validated)."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CompressError


def check_output(out: Path, overwrite: bool, example: str) -> None:
    """CompressError when ``out`` is a directory, or exists and ``overwrite`` is False.

    example: a file name to suggest inside a directory given by mistake (``model.onnx``).
    """
    if out.is_dir():
        raise CompressError(f"output {out} is a directory; give a file name such as {out / example}")
    if out.exists() and not overwrite:
        raise CompressError(f"output {out} exists; pass --overwrite to replace it")


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh hidden directory beside ``out`` (same file system, so renames are atomic), removed
    when the block ends whatever happens; the caller moves the finished files out of it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(tmp: Path, out: Path) -> str | None:
    """Rename the file ``tmp / out.name`` (and any side files beside it, such as ONNX external
    data, first) to ``out``'s directory; returns the side file's new path, if any."""
    data = [f for f in tmp.iterdir() if f.name != out.name]
    target_data = None
    for f in data:
        target_data = out.parent / f.name
        os.replace(f, target_data)
    stale = out.with_name(out.name + ".data")
    if not data and stale.exists() and out.exists():
        stale.unlink()  # an earlier export of this name had external data; this one has none
    os.replace(tmp / out.name, out)
    return str(target_data) if target_data else None


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the tensor files of a compressed directory (every *.safetensors in it)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
