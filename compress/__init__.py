"""compress: sensitivity-driven mixed-precision compression for PyTorch / Hugging Face models."""

__version__ = "0.1.0"
