"""Calibration and evaluation text: files, the embedded default corpus, tokenisation and batching."""
from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path | None:
    """The folder of real evaluation data beside the project, or None when it is absent.

    Looked up in ``$COMPRESS_DATA`` first, then ``../shared/data`` relative to the repository root.
    Nothing from it is ever committed into the repository; tests that need it skip without it.
    """
    env = os.environ.get("COMPRESS_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None
