"""HiRED token dropping (Arif et al., AAAI 2025) for Hugging Face vision encoders and LLaVA models.

HiRED keeps a fixed budget of an image's patch tokens, chosen by the vision encoder's own CLS
attention, with no training:

* CLS attention of a layer = softmax(q_cls . K^T * scale) per head, reduced over heads (sum by
  default), restricted to the N patch tokens. It is computed from the queries and keys that the
  layer's ``q_proj`` / ``k_proj`` produce (captured by forward hooks), so the model keeps its own
  attention implementation (SDPA, flash, eager) and no full attention map is ever materialised.
* Budget: ``B = max(1, floor(P * N * rate))`` for P partitions of N patch tokens. With P = 1 (a
  plain ViT, CLIP or LLaVA-1.5) the single partition gets all of B. With P > 1 (LLaVA-Next: the
  downsampled full image, then its sub-images) the full image gets ``min(floor(alpha * B), N)`` and
  the sub-images share the rest in proportion to the full image's initial-layer CLS attention over
  the full-image tokens that cover each sub-image's region (see ``region_weights``).
* Selection: each partition keeps its top-N_p tokens by final-layer CLS attention, in raster order.

Where the tokens go:

* ``ViTModel`` / ``ViTForImageClassification`` / ``CLIPVisionModel`` (and ``WithProjection``):
  tokens are dropped right after ``final_layer`` using that layer's CLS attention; later layers,
  the pooler and the classifier see the CLS token plus the kept tokens. The default is half-way
  (after layer ``L // 2 - 1`` of L): after the last layer nothing would be saved, since the
  classifier and the pooler read only CLS.
* ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` (and their bare
  ``*Model``): the vision tower runs in full; the kept image features replace all of them before the
  language model, and the image placeholder tokens in ``input_ids`` (with ``attention_mask``,
  ``labels``, ``position_ids``) are shrunk to match inside the wrapped ``forward`` and
  ``generate``. ``forward`` therefore returns logits over the shortened sequence; ``generate``
  returns the caller's original prompt followed by the new tokens, as the stock model does.

Modules: ``config`` (HiredConfig, the plan section), ``selection`` (pure tensor functions: CLS
attention, budgets, sub-image shares, top-k), ``encoder`` (query/key capture, dropping inside a
ViT / CLIP encoder), ``llava`` (LLaVA / LLaVA-Next glue), ``wrapper`` (apply_hired, remove_hired).
"""
from .config import ALLOCATIONS, HEAD_REDUCTIONS, METHOD, HiredConfig, hired_config_of
from .llava import hired_image_features, shrink_placeholders
from .selection import (apportion, cls_attention, hired_keep_indices, partition_budgets, region_weights,
                        row_band_weights, select_tokens, token_budget)
from .wrapper import SUPPORTED_ARCHITECTURES, apply_hired, remove_hired

__all__ = [
    "ALLOCATIONS", "HEAD_REDUCTIONS", "METHOD", "SUPPORTED_ARCHITECTURES", "HiredConfig", "apply_hired",
    "apportion", "cls_attention", "hired_config_of", "hired_image_features", "hired_keep_indices",
    "partition_budgets", "region_weights", "remove_hired", "row_band_weights", "select_tokens",
    "shrink_placeholders", "token_budget",
]
