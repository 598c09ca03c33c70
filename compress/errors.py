"""The exception types the CLI turns into one line, and the install hints of optional packages.

The CLI turns a ``CompressError`` (including ``DiskFullError``) into a single line on stderr and
exit status 2, and an ``Interrupted`` (SIGINT / SIGTERM) into one line and exit 128 + the signal
number; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import signal
from pathlib import Path


class CompressError(ValueError):
    """Bad input from the user: a path, a plan entry, a number out of range. The message names it."""


class DiskFullError(CompressError):
    """The disk (or the user's quota) filled while writing an output; the partial output is removed.

    The message names the output, the bytes it needed (or at least had written) and the bytes free.
    """


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised from the CLI's signal handler.

    A KeyboardInterrupt so that every ``except BaseException`` cleanup (the atomic writers'
    removal of their temporary directories) runs exactly as for Ctrl-C. ``signum`` is the signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def install_hint(extra: str, packages: str) -> str:
    """How to install an optional dependency: ``pip install PACKAGES``, plus this checkout's extra.

    Never the extra of the bare name ``compress``: on the package index that name belongs to an
    unrelated project, so the extra is named through the path of the checkout this package was
    installed from (only when that checkout is still there, e.g. an editable install).
    """
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    try:
        ours = pyproject.is_file() and 'name = "compress"' in pyproject.read_text()
    except OSError:
        ours = False
    hint = f"pip install {packages}"
    return f'{hint} (or, from this checkout: pip install "{root}[{extra}]")' if ours else hint
