"""HiRED's settings (a plan's ``token_dropping`` section) and where a wrapped model keeps them."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from compress.errors import CompressError

METHOD = "hired"
HEAD_REDUCTIONS = ("sum", "max")
# "region": sub-image shares from the full-image attention mass over each sub-image's true 2-D
# region, apportioned so that the budgets add up exactly. "row_bands": what the released HiRED code
# does: the top floor(N * (1 - alpha)) full-image tokens are binarised, the flattened token list is
# cut into P - 1 equal bands, and floor(share * N_sub) is kept per sub-image (may not add up).
ALLOCATIONS = ("region", "row_bands")


@dataclass
class HiredConfig:
    """Settings of HiRED token dropping, as stored in a plan's ``token_dropping`` section.

    rate: kept fraction of the patch tokens, in (0, 1]. alpha: share of the budget that goes to
    the full image when there are sub-images, in [0, 1]. initial_layer: encoder layer whose CLS
    attention splits the budget between sub-images. final_layer: encoder layer whose CLS attention
    selects the tokens; negative values count from the end like Python indices.
    head_reduce: how the heads' CLS attention is combined. allocation: one of ``ALLOCATIONS``.
    image_newline: LLaVA-Next only; keep the ``image_newline`` token after each row of the stitched
    sub-image grid (the released HiRED code drops them, so the default is False).

    The default final_layer (None) drops tokens where it saves work for each kind of model:

    * ViT / CLIP vision encoders (and ViT classifiers, which read only the CLS token): after layer
      ``L // 2 - 1`` of L (``encoder.default_drop_layer``), so the second half of the encoder runs
      on CLS + the kept tokens; chosen by measurement on an MNIST ViT (bench/hired.py). Dropping
      after the last layer, the earlier default, changed no classifier output and saved nothing.
    * LLaVA / LLaVA-Next: the layer that produces ``vision_feature_layer``; the vision tower runs
      in full and the language model, where the work is, sees only the kept visual tokens.
    """

    rate: float = 0.2
    alpha: float = 0.5
    initial_layer: int = 0
    final_layer: int | None = None
    head_reduce: str = "sum"
    allocation: str = "region"
    image_newline: bool = False

    def __post_init__(self):
        for name in ("rate", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise CompressError(f"hired {name} must be a number, got {value!r}")
        if not 0.0 < self.rate <= 1.0:
            raise CompressError(f"hired rate must be in (0, 1], got {self.rate}")
        if not 0.0 <= self.alpha <= 1.0:
            raise CompressError(f"hired alpha must be in [0, 1], got {self.alpha}")
        for name in ("initial_layer", "final_layer"):
            value = getattr(self, name)
            if value is None and name == "final_layer":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise CompressError(f"hired {name} must be an integer layer index, got {value!r}")
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise CompressError(f"hired head_reduce must be one of {HEAD_REDUCTIONS}, got {self.head_reduce!r}")
        if self.allocation not in ALLOCATIONS:
            raise CompressError(f"hired allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if not isinstance(self.image_newline, bool):
            raise CompressError(f"hired image_newline must be true or false, got {self.image_newline!r}")

    def to_dict(self) -> dict:
        """The plan's ``token_dropping`` section: ``{"method": "hired", "rate": ..., ...}``."""
        return {"method": METHOD, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> HiredConfig:
        """Inverse of ``to_dict``; unknown keys or another method are errors that name them."""
        if not isinstance(d, dict):
            raise CompressError(f"token_dropping must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        method = d.pop("method", METHOD)
        if method != METHOD:
            raise CompressError(f"token_dropping method {method!r} is not supported; supported: [{METHOD!r}]")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CompressError(f"token_dropping has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)


# apply_hired keeps its hooks, wrapped methods and config in the model's __dict__ under this name
STATE_ATTR = "_compress_hired"


def wrapper_state(model: torch.nn.Module) -> dict | None:
    """What ``apply_hired`` stored on ``model`` (config, capture, hooks, wrapped methods), or None."""
    return model.__dict__.get(STATE_ATTR)


def hired_config_of(model: torch.nn.Module) -> HiredConfig | None:
    """The HiredConfig that ``apply_hired`` put on ``model``, or None."""
    state = wrapper_state(model)
    return None if state is None else state["config"]
