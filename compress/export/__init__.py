"""Exporters of compressed directories, each validated by its consumer's own reader.

    onnx_ops      QuantLinear -> com.microsoft MatMulNBits tensors and export modules; onnxruntime sessions
    onnx_embed    QuantEmbedding -> com.microsoft GatherBlockQuantized; tied heads on the same initializers
    onnx_export   whole models to ONNX (torch.onnx dynamo), validated in onnxruntime: export_onnx
    validate      reference runs and the agreement measures (relative error, KL, top-1)
    gguf_blocks   compress storage -> GGUF block types (Q4_0, Q4_1, Q8_0, F16): gguf_compatible
    gguf_vocab    Hugging Face tokenizers -> llama.cpp's vocabulary metadata
    gguf_export   Llama-architecture causal LMs to GGUF for llama.cpp / ollama: export_gguf

The heavy dependencies (onnx, onnxruntime, gguf) are imported where used, so importing this
package needs none of them.
"""
from .gguf_blocks import GGUF_BLOCK, gguf_compatible, gguf_type
from .gguf_export import GGUFReport, SUPPORTED_ARCHITECTURES, export_gguf
from .onnx_export import (DEFAULT_ACCURACY_LEVEL, ExportReport, export_onnx, graph_dtype, io_names,
                          swap_for_export, unmappable_layers)
from .onnx_embed import (GatherBlockQuantizedEmbedding, gather_block_quantized_model, gather_tensors,
                         ort_supports_gather)
from .onnx_ops import (INSTALL_HINT, REBLOCK, DequantizeMatMulLinear, MatMulNBitsLinear, NBitsTensors,
                       matmul_nbits_model, nbits_dequantize, nbits_tensors, ort_session, ort_supports_nbits,
                       require_onnx, row_block_size)
from .validate import (KL_TOLERANCE, TOLERANCE, Agreement, compare, empty_past, kv_shape, logit_agreement,
                       reference_runs, sample_batches)

__all__ = [
    "Agreement", "DEFAULT_ACCURACY_LEVEL", "DequantizeMatMulLinear", "ExportReport", "GGUFReport", "GGUF_BLOCK",
    "GatherBlockQuantizedEmbedding", "gather_block_quantized_model", "gather_tensors", "ort_supports_gather",
    "INSTALL_HINT", "KL_TOLERANCE", "MatMulNBitsLinear", "NBitsTensors", "REBLOCK", "SUPPORTED_ARCHITECTURES",
    "TOLERANCE", "compare", "empty_past", "export_gguf", "export_onnx", "gguf_compatible", "gguf_type",
    "graph_dtype", "io_names", "kv_shape", "logit_agreement", "matmul_nbits_model", "nbits_dequantize",
    "nbits_tensors", "ort_session", "ort_supports_nbits", "reference_runs", "require_onnx", "row_block_size",
    "sample_batches", "swap_for_export", "unmappable_layers",
]
