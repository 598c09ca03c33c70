"""Switching HiRED on and off: ``apply_hired`` puts hooks and wrapped methods on a model, ``remove_hired``
takes them away."""
from __future__ import annotations

import torch

from compress.errors import CompressError

from .config import STATE_ATTR, HiredConfig, wrapper_state
from .encoder import apply_to_encoder
from .llava import apply_to_llava

SUPPORTED_ARCHITECTURES = (
    "ViTModel",
    "ViTForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "LlavaModel",
    "LlavaForConditionalGeneration",
    "LlavaNextModel",
    "LlavaNextForConditionalGeneration",
)


def apply_hired(model: torch.nn.Module, config: HiredConfig) -> torch.nn.Module:
    """Switch on HiRED token dropping in place (hooks and wrapped methods); returns ``model``.

    Supported: the classes in ``SUPPORTED_ARCHITECTURES`` (LLaVA ones with a CLIP vision tower).
    Applying twice is an error; ``remove_hired`` undoes it.
    """
    from transformers import (CLIPVisionModel, CLIPVisionModelWithProjection, LlavaForConditionalGeneration,
                              LlavaModel, LlavaNextForConditionalGeneration, LlavaNextModel,
                              ViTForImageClassification, ViTModel)

    if not isinstance(config, HiredConfig):
        raise CompressError(f"apply_hired needs a HiredConfig, got {type(config).__name__}")
    if wrapper_state(model) is not None:
        raise CompressError(f"HiRED is already applied to this {type(model).__name__}; call remove_hired first")
    if isinstance(model, (ViTModel, ViTForImageClassification, CLIPVisionModel, CLIPVisionModelWithProjection)):
        state = apply_to_encoder(model, config)
    elif isinstance(model, (LlavaModel, LlavaForConditionalGeneration, LlavaNextModel,
                            LlavaNextForConditionalGeneration)):
        state = apply_to_llava(model, config)
    else:
        raise CompressError(f"HiRED does not support {type(model).__name__}; supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    state["config"] = config
    model.__dict__[STATE_ATTR] = state
    return model


def remove_hired(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply_hired``: remove its hooks and wrapped methods; returns ``model``."""
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is None:
        raise CompressError(f"HiRED is not applied to this {type(model).__name__}")
    state["capture"].remove()
    for handle in state["handles"]:
        handle.remove()
    for name, shadowed in state["methods"].items():
        if shadowed is None:
            del model.__dict__[name]
        else:
            model.__dict__[name] = shadowed
    return model
