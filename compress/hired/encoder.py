"""HiRED inside a vision encoder: capturing a layer's queries and keys, and dropping tokens after it.

For ``ViTModel`` / ``ViTForImageClassification`` / ``CLIPVisionModel`` (and ``WithProjection``) the
tokens are dropped inside the encoder (``apply_to_encoder``); LLaVA's glue only reuses the capture
and the layer lookup.
"""
from __future__ import annotations

import functools

import torch

from compress.errors import CompressError

from .config import HiredConfig
from .selection import cls_attention, token_budget

# --------------------------------------------------------------------------------------------
# Capturing queries and keys with forward hooks


class QKCapture:
    """Forward hooks on ``q_proj`` / ``k_proj`` of some attention modules; keeps their last outputs."""

    def __init__(self, attentions: dict[int, torch.nn.Module], head_reduce: str):
        self.head_reduce = head_reduce
        self.attentions = attentions
        self.active = False
        self.store: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []
        for layer, attn in attentions.items():
            for name in ("q", "k"):
                hook = functools.partial(self._keep, (layer, name))
                self.handles.append(getattr(attn, f"{name}_proj").register_forward_hook(hook))

    def _keep(self, key, module, args, output):
        if self.active:
            self.store[key] = output.detach()

    def attention(self, layer: int) -> torch.Tensor:
        """(B, N) CLS attention of ``layer`` from the captured outputs; frees them."""
        attn = self.attentions[layer]
        q, k = self.store.pop((layer, "q"), None), self.store.pop((layer, "k"), None)
        if q is None or k is None:
            raise RuntimeError(f"no queries/keys were captured for vision layer {layer}: were its q_proj/k_proj "
                               "replaced after apply_hired? Apply HiRED after swapping modules")
        scale = getattr(attn, "scaling", getattr(attn, "scale", attn.head_dim ** -0.5))
        return cls_attention(q, k, attn.head_dim, scale, self.head_reduce)

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.store.clear()


def encoder_layers(encoder: torch.nn.Module) -> tuple[torch.nn.ModuleList, str]:
    """The layer list of a supported vision encoder and the name of each layer's attention module."""
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection, ViTForImageClassification, ViTModel

    if isinstance(encoder, ViTForImageClassification):
        encoder = encoder.vit
    if isinstance(encoder, CLIPVisionModelWithProjection):
        encoder = encoder.vision_model
    if isinstance(encoder, ViTModel):
        return encoder.layers, "attention"
    if isinstance(encoder, CLIPVisionModel):
        return encoder.encoder.layers, "self_attn"
    raise CompressError(
        f"HiRED needs a vision encoder with a CLS token; {type(encoder).__name__} is not supported "
        f"(supported vision encoders: ViTModel, CLIPVisionModel)")


def resolve_layer(index: int, num_layers: int, name: str) -> int:
    """``index`` (negative counts from the end) as a layer number in [0, num_layers), or a CompressError."""
    if not -num_layers <= index < num_layers:
        raise CompressError(f"hired {name}={index} is out of range for a {num_layers}-layer vision encoder")
    return index % num_layers


# --------------------------------------------------------------------------------------------
# Plain encoders: drop tokens right after the final layer


def default_drop_layer(num_layers: int) -> int:
    """The layer after which a plain ViT / CLIP encoder drops tokens when ``final_layer`` is None.

    ``max(0, num_layers // 2 - 1)`` (0-based): the first half of the layers sees every token, the
    second half CLS + the kept ones. Dropping after the last layer would save nothing, since the
    classifier and the pooler read only the CLS token. Half-way is the measured trade
    (bench/hired.py --part quality, bench/results/hired_quality.md, a 4-layer MNIST ViT, 2 seeds):
    to stay within 1 point of all tokens' accuracy, dropping after layer 1 leaves 68 % of the
    FLOPs (rate 0.4), after layer 2 84 %, and after layer 0 no rate below 1 stays within 2 points.
    """
    return max(0, num_layers // 2 - 1)


class DropAfterLayer:
    """Forward hook on encoder layer ``layer``: keep CLS + the top tokens by that layer's CLS attention.

    A class, not a closure, so that ``copy.deepcopy`` of a wrapped model copies it with its capture.
    """

    def __init__(self, capture: QKCapture, layer: int, rate: float):
        self.capture, self.layer, self.rate = capture, layer, rate

    def __call__(self, module, args, kwargs, output):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None:
            raise CompressError("HiRED cannot drop tokens of an encoder called with an attention_mask")
        hidden = output[0] if isinstance(output, tuple) else output               # (B, 1 + N, D)
        scores = self.capture.attention(self.layer)                                # (B, N)
        keep = scores.topk(token_budget(1, scores.shape[1], self.rate), dim=1).indices.sort(dim=1).values + 1
        keep = torch.cat([keep.new_zeros(keep.shape[0], 1), keep], dim=1).to(hidden.device)
        reduced = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
        return (reduced, *output[1:]) if isinstance(output, tuple) else reduced


def apply_to_encoder(model: torch.nn.Module, config: HiredConfig) -> dict:
    """Hook the final layer of a ViT / CLIP vision encoder to drop tokens; returns the wrapper state.

    ``final_layer`` None means ``default_drop_layer``; the state records the layer used as "final".
    """
    layers, attn_name = encoder_layers(model)
    final = default_drop_layer(len(layers)) if config.final_layer is None else config.final_layer
    final = resolve_layer(final, len(layers), "final_layer")
    resolve_layer(config.initial_layer, len(layers), "initial_layer")
    capture = QKCapture({final: getattr(layers[final], attn_name)}, config.head_reduce)
    capture.active = True
    # prepend: hooks that were there first (transformers' hidden-state recorder is installed on the first
    # output_hidden_states call) must see the layer's output as the next layer does, after the drop
    handle = layers[final].register_forward_hook(DropAfterLayer(capture, final, config.rate), with_kwargs=True,
                                                 prepend=True)
    return {"capture": capture, "handles": [handle], "methods": {}, "final": final}

