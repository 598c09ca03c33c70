"""kernel_linear: QuantLinear.forward's fast path, y = x Wᵀ + b through the Triton kernels.

The per-call Python work is kept small because at M = 1 it is comparable to the kernel itself: the
weight-side checks run once per layer and are cached on it (keyed by the identity of its buffers,
so ``module.to(...)`` or a reload re-validates), and each call checks only x.
"""
from __future__ import annotations

import torch

from compress.errors import CompressError

from .w4a16 import check_weights as check_w4
from .w4a16 import w4a16_matmul
from .w8a16 import check_weights as check_w8
from .w8a16 import w8a16_matmul
from ._common import ACTIVATION_DTYPES, check_bias

_CACHE_ATTR = "_kernel_checked"


def _weights_key(layer, device: torch.device) -> tuple:
    return (layer.qweight, layer.scales, getattr(layer, "zeros", None), layer.bias, device)


def _check_layer(layer, device: torch.device) -> None:
    """Validate the layer's packed buffers once; cache the verdict on the layer."""
    key = _weights_key(layer, device)
    cached = getattr(layer, _CACHE_ATTR, None)
    if cached is not None and all(a is b for a, b in zip(cached[:4], key[:4])) and cached[4] == device:
        return
    op = f"{type(layer).__name__}({layer.in_features}->{layer.out_features}, bits={layer.bits})"
    try:
        if layer.bits == 4:
            zeros = None if layer.symmetric else layer.zeros
            n, _, _ = check_w4(layer.qweight, layer.scales, zeros, layer.in_features, layer.group_size, device)
        elif layer.bits == 8:
            n = check_w8(layer.qweight, layer.scales, layer.in_features, device)
        else:
            raise CompressError(f"no kernel for {layer.bits}-bit weights")
        check_bias(layer.bias, n, device, f"w{layer.bits}a16")
    except CompressError as e:
        raise CompressError(f"{op}: {e}") from None
    # A plain attribute, not a buffer: it must not reach state_dict or safetensors.
    object.__setattr__(layer, _CACHE_ATTR, key)


def kernel_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """y (..., N) = x (..., K) @ Wᵀ + bias for a QuantLinear ``layer`` (4- or 8-bit), in x's dtype.

    x: float16 or bfloat16 on the layer's device (QuantLinear.forward sends every other case to
    its reference). The launch shape is chosen per call: decode (split-K) for M <= 16 rows, tiled
    gemm above.
    """
    if x.dtype not in ACTIVATION_DTYPES:
        raise CompressError(f"kernel_linear takes float16 or bfloat16 activations, got {x.dtype}")
    k = x.shape[-1]
    if x.numel() == 0 and k == layer.in_features:  # an empty batch, as nn.Linear allows
        return x.new_empty(*x.shape[:-1], layer.out_features)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    _check_layer(layer, x.device)
    if layer.bits == 4:
        zeros = None if layer.symmetric else layer.zeros
        out = w4a16_matmul(x2, layer.qweight, layer.scales, zeros, layer.in_features, layer.group_size,
                           layer.bias, checked=True)
    else:
        out = w8a16_matmul(x2, layer.qweight, layer.scales, layer.bias, checked=True)
    return out.reshape(*x.shape[:-1], layer.out_features)
