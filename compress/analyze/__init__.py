"""Sensitivity analyzers: how much each block or linear layer of a model suffers from compression.

One file per method, each registered by name in ``REGISTRY`` (name -> (config class, function)):
cmpq (canonical correlation), pmpq (magnitude-pruning probe), tdmpq (Gaussian-noise probe),
taylor and fisher (gradients priced against the actual quantization error), oracle (measured
damage of quantizing one unit at a time). ``analyze(loaded, method, texts, **options)`` returns a
``Sensitivity``; ``analyzer_report`` compares methods with the oracle.
"""
from . import cmpq, gradient, oracle, pmpq, tdmpq  # noqa: F401  (register the methods)
from .api import analyze
from .base import REGISTRY, AnalyzerConfig, Sensitivity, build_units, get_analyzer, make_config, register
from .report import analyzer_report, format_report, spearman

__all__ = ["REGISTRY", "AnalyzerConfig", "Sensitivity", "analyze", "analyzer_report", "build_units",
           "format_report", "get_analyzer", "make_config", "register", "spearman"]
