"""compress: sensitivity-driven mixed-precision compression for PyTorch / Hugging Face models.

    import compress
    p = compress.plan("minilm", bits=4, group_size=32)
    compress.apply("minilm", p, "minilm-int4")
    lm = compress.load("minilm-int4")          # lm.model, lm.tokenizer
    compress.evaluate("minilm-int4")           # quality vs the original, and sizes
"""

__version__ = "0.1.0"

import sys as _sys  # noqa: E402
import types as _types  # noqa: E402

from .errors import CompressError  # noqa: E402

__all__ = ["plan", "apply", "load", "evaluate", "inspect", "fit_head", "predict", "CompressError", "__version__"]
_API = ("plan", "apply", "load", "evaluate", "inspect", "fit_head", "predict")


def __getattr__(name: str):
    # The front door (compress.api, which imports torch) loads on first use, not with the package:
    # `compress CMD` and `python -m compress` import this package before the CLI's signal handlers
    # exist, so an eager torch import here would meet a Ctrl-C with a raw traceback (issue 15).
    if name in _API:
        from . import api

        globals().update({n: getattr(api, n) for n in _API})
        return globals()[name]
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(_types.ModuleType):
    """The package object: importing the submodules compress.apply / compress.evaluate / ... must
    not bind them over the API functions of the same names (the import system sets the parent's
    attribute after loading a submodule; with the API loaded lazily that would otherwise win)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, _types.ModuleType):
            return  # the submodule stays reachable through sys.modules / importlib
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
