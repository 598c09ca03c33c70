"""Triton kernels, importable as ``compress.kernels`` (never as a top-level ``kernels``)."""
