"""compress: sensitivity-driven mixed-precision compression for PyTorch / Hugging Face models.

    import compress
    p = compress.plan("minilm", bits=4, group_size=32)
    compress.apply("minilm", p, "minilm-int4")
    lm = compress.load("minilm-int4")          # lm.model, lm.tokenizer
    compress.evaluate("minilm-int4")           # quality vs the original, and sizes
"""

__version__ = "0.1.0"

from .api import apply, evaluate, fit_head, inspect, load, plan, predict  # noqa: E402
from .errors import CompressError  # noqa: E402

__all__ = ["plan", "apply", "load", "evaluate", "inspect", "fit_head", "predict", "CompressError", "__version__"]
