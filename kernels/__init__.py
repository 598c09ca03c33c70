"""Triton kernels, importable as ``compress.kernels`` (never as a top-level ``kernels``).

  w4a16   int4 group-wise weights x fp16/bf16 activations: ``w4a16_matmul`` + ``w4a16_reference``
  w8a16   int8 per-channel weights x fp16/bf16 activations: ``w8a16_matmul`` + ``w8a16_reference``
  linear  ``kernel_linear(x, layer)``: QuantLinear.forward's CUDA path (validation cached per layer)
  _common tile mapping, exact int->float conversions, the split-K epilogue, launcher checks

Submodules import Triton; this package does not, so ``import compress.kernels`` stays cheap.
"""
