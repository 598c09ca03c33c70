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
  tokens are dropped right after ``final_layer`` (default: the last layer) using that layer's CLS
  attention; later layers, the pooler and the classifier see the CLS token plus the kept tokens.
* ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` (and their bare
  ``*Model``): the vision tower runs in full; the kept image features replace all of them before the
  language model, and the image placeholder tokens in ``input_ids`` (with ``attention_mask``,
  ``labels``, ``position_ids``) are shrunk to match inside the wrapped ``forward`` and
  ``generate``. ``forward`` therefore returns logits over the shortened sequence; ``generate``
  returns the caller's original prompt followed by the new tokens, as the stock model does.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
from dataclasses import dataclass

import torch

from compress.errors import CompressError

METHOD = "hired"
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
HEAD_REDUCTIONS = ("sum", "max")
# "region": sub-image shares from the full-image attention mass over each sub-image's true 2-D
# region, apportioned so that the budgets add up exactly. "row_bands": what the released HiRED code
# does: the top floor(N * (1 - alpha)) full-image tokens are binarised, the flattened token list is
# cut into P - 1 equal bands, and floor(share * N_sub) is kept per sub-image (may not add up).
ALLOCATIONS = ("region", "row_bands")
_STATE_ATTR = "_compress_hired"
_EPS = 1e-9  # floor(P * N * rate) must not lose a token to float error (0.29 * 100 = 28.999...)


@dataclass
class HiredConfig:
    """Settings of HiRED token dropping, as stored in a plan's ``token_dropping`` section.

    rate: kept fraction of the patch tokens, in (0, 1]. alpha: share of the budget that goes to
    the full image when there are sub-images, in [0, 1]. initial_layer: encoder layer whose CLS
    attention splits the budget between sub-images. final_layer: encoder layer whose CLS attention
    selects the tokens (None: the layer that produces LLaVA's ``vision_feature_layer``, or the last
    layer of a plain encoder); negative values count from the end like Python indices.
    head_reduce: how the heads' CLS attention is combined. allocation: one of ``ALLOCATIONS``.
    image_newline: LLaVA-Next only; keep the ``image_newline`` token after each row of the stitched
    sub-image grid (the released HiRED code drops them, so the default is False).
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


# --------------------------------------------------------------------------------------------
# Core: pure tensor functions (the tests compare them with a reference on full attention maps)


def cls_attention(queries: torch.Tensor, keys: torch.Tensor, head_dim: int, scale: float,
                  head_reduce: str = "sum", num_prefix: int = 1) -> torch.Tensor:
    """CLS attention over the patch tokens, from one layer's projected queries and keys.

    queries, keys: (B, T, H * head_dim), any float dtype, token 0 being CLS. Returns (B, T -
    num_prefix) float32: softmax over all T keys of the CLS query row, per head, then summed (or
    maxed) over the H heads, keeping the columns of the tokens after the ``num_prefix`` prefix.
    """
    batch, tokens, width = keys.shape
    heads = width // head_dim
    q = queries[:, 0].float().view(batch, heads, head_dim)                       # (B, H, d)
    k = keys.float().view(batch, tokens, heads, head_dim)                        # (B, T, H, d)
    probs = (torch.einsum("bhd,bthd->bht", q, k) * scale).softmax(dim=-1)        # (B, H, T)
    probs = probs[:, :, num_prefix:]
    return probs.sum(dim=1) if head_reduce == "sum" else probs.amax(dim=1)


def token_budget(num_partitions: int, num_tokens: int, rate: float) -> int:
    """B = max(1, floor(P * N * rate)): the number of patch tokens an image keeps."""
    return max(1, math.floor(num_partitions * num_tokens * rate + _EPS))


def region_weights(full_attention: torch.Tensor, sub_grid: tuple[int, int],
                   content: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> torch.Tensor:
    """Initial-layer attention mass of the full image over each sub-image's 2-D region.

    full_attention: (gh, gw) attention of the full image's patch tokens in raster order.
    sub_grid: (nh, nw) sub-images tiling the high-resolution canvas in raster order.
    content: (top, left, height, width) of the full image's content inside that canvas, as
    fractions of the canvas (LLaVA-Next pads the canvas but not the downsampled full image).
    Each token's attention is split between the sub-images by the area of overlap, so the
    returned (nh * nw,) float64 weights sum to the attention inside the canvas.
    """
    gh, gw = full_attention.shape
    nh, nw = sub_grid
    top, left, height, width = content

    def overlap(count: int, start: float, extent: float, cells: int) -> torch.Tensor:
        # (count, cells): fraction of each token's span (along one axis) inside each cell's span
        t0 = start + extent * torch.arange(count, dtype=torch.float64) / count
        c0 = torch.arange(cells, dtype=torch.float64) / cells
        lo = torch.maximum(t0[:, None], c0[None, :])
        hi = torch.minimum(t0[:, None] + extent / count, c0[None, :] + 1.0 / cells)
        return (hi - lo).clamp_min(0.0) * count / extent

    rows = overlap(gh, top, height, nh)                                          # (gh, nh)
    cols = overlap(gw, left, width, nw)                                          # (gw, nw)
    return (rows.T @ full_attention.double().cpu() @ cols).flatten()


def row_band_weights(full_attention: torch.Tensor, num_sub: int, alpha: float) -> torch.Tensor:
    """The released code's sub-image shares: binarised top tokens counted in row bands.

    full_attention: (N,) initial-layer attention of the full image. The top floor(N * (1 - alpha))
    tokens count 1, the rest 0, and the flattened list is cut into ``num_sub`` equal bands.
    Returns (num_sub,) float64 counts.
    """
    n = full_attention.numel()
    if n % num_sub:
        raise CompressError(f"row_bands allocation needs N={n} patch tokens divisible by {num_sub} sub-images")
    marked = torch.zeros(n, dtype=torch.float64)
    marked[full_attention.flatten().topk(int(n * (1 - alpha))).indices.cpu()] = 1.0
    return marked.view(num_sub, -1).sum(dim=1)


def apportion(weights: torch.Tensor, total: int, cap: int) -> list[int]:
    """Split ``total`` tokens in proportion to ``weights`` (S,), each share at most ``cap``.

    Shares over the cap are fixed at the cap and the rest re-split; the fractional parts are then
    rounded by largest remainder (ties to the lower index), so the shares add up to ``total``
    exactly. All-zero weights split evenly. Requires total <= S * cap.
    """
    w = weights.double().cpu().clamp_min(0.0)
    size = w.numel()
    if total > size * cap:
        raise CompressError(f"cannot place {total} tokens in {size} partitions of {cap}")
    quotas = torch.zeros(size, dtype=torch.float64)
    free = torch.ones(size, dtype=torch.bool)
    remaining = float(total)
    while remaining > 0 and free.any():
        fw = torch.where(free, w, torch.zeros_like(w))
        fw = fw if fw.sum() > 0 else free.double()
        share = remaining * fw / fw.sum()
        over = free & (share > cap)
        if not over.any():
            quotas[free] = share[free]
            break
        quotas[over] = cap
        remaining -= cap * int(over.sum())
        free &= ~over
    shares = quotas.floor().clamp(max=cap)
    left = total - int(shares.sum())
    if left > 0:
        frac = torch.where(shares < cap, quotas - shares, torch.full_like(quotas, -1.0))
        order = sorted(range(size), key=lambda i: (-float(frac[i]), i))
        for i in order[:left]:
            shares[i] += 1
    return [int(s) for s in shares]


def partition_budgets(num_partitions: int, num_tokens: int, config: HiredConfig,
                      sub_weights: torch.Tensor | None = None) -> list[int]:
    """Tokens kept per partition: (full image, sub-image 1, ...) for one image.

    sub_weights: (P - 1,) shares of the sub-images (``region_weights`` or ``row_band_weights``);
    required when P > 1. With allocation "region" the budgets add up to ``token_budget`` exactly:
    what the sub-images cannot hold goes back to the full image. With "row_bands" they follow the
    released code (floored, so they may add up to less).
    """
    total = token_budget(num_partitions, num_tokens, config.rate)
    if num_partitions == 1:
        return [total]
    full = min(math.floor(config.alpha * total + _EPS), num_tokens)
    sub_cap = (num_partitions - 1) * num_tokens
    if config.allocation == "row_bands":
        sub_total = min(total - full, sub_cap)
        w = sub_weights.double().cpu()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / w.numel())
        return [full] + [min(int(x), num_tokens) for x in (w * sub_total).tolist()]
    sub_total = total - full
    if sub_total > sub_cap:
        full, sub_total = full + sub_total - sub_cap, sub_cap
    return [full] + apportion(sub_weights, sub_total, num_tokens)


def select_tokens(scores: torch.Tensor, budgets: list[int]) -> list[torch.Tensor]:
    """Top-``budgets[p]`` tokens of each partition by ``scores`` (P, N), in ascending (raster) order.

    Returns P int64 tensors of token indices in [0, N).
    """
    return [scores[p].topk(k).indices.sort().values for p, k in enumerate(budgets)]


def hired_keep_indices(final_attention: torch.Tensor, config: HiredConfig,
                       initial_attention: torch.Tensor | None = None,
                       sub_grid: tuple[int, int] | None = None,
                       content: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> list[torch.Tensor]:
    """HiRED's kept token indices for one image of P partitions.

    final_attention, initial_attention: (P, N) CLS attention of the final / initial layer,
    partition 0 being the full image. sub_grid: (nh, nw) with nh * nw = P - 1, needed when P > 1.
    The full image's N tokens must form a square grid for "region" allocation. Returns P sorted
    int64 index tensors.
    """
    parts, n = final_attention.shape
    weights = None
    if parts > 1:
        if sub_grid is None or sub_grid[0] * sub_grid[1] != parts - 1:
            raise CompressError(f"{parts} partitions need a sub-image grid of {parts - 1} cells, got {sub_grid}")
        full = initial_attention[0]
        if config.allocation == "row_bands":
            weights = row_band_weights(full, parts - 1, config.alpha)
        else:
            side = math.isqrt(n)
            if side * side != n:
                raise CompressError(f"region allocation needs a square patch grid, got N={n} tokens")
            weights = region_weights(full.view(side, side), sub_grid, content)
    return select_tokens(final_attention, partition_budgets(parts, n, config, weights))


# --------------------------------------------------------------------------------------------
# Capturing queries and keys with forward hooks


class _QKCapture:
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


def _encoder_layers(encoder: torch.nn.Module) -> tuple[torch.nn.ModuleList, str]:
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


def _resolve_layer(index: int, num_layers: int, name: str) -> int:
    if not -num_layers <= index < num_layers:
        raise CompressError(f"hired {name}={index} is out of range for a {num_layers}-layer vision encoder")
    return index % num_layers


# --------------------------------------------------------------------------------------------
# Plain encoders: drop tokens right after the final layer


class _DropAfterLayer:
    """Forward hook on encoder layer ``layer``: keep CLS + the top tokens by that layer's CLS attention.

    A class, not a closure, so that ``copy.deepcopy`` of a wrapped model copies it with its capture.
    """

    def __init__(self, capture: _QKCapture, layer: int, rate: float):
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


def _apply_encoder(model: torch.nn.Module, config: HiredConfig) -> dict:
    layers, attn_name = _encoder_layers(model)
    final = _resolve_layer(-1 if config.final_layer is None else config.final_layer, len(layers), "final_layer")
    _resolve_layer(config.initial_layer, len(layers), "initial_layer")
    capture = _QKCapture({final: getattr(layers[final], attn_name)}, config.head_reduce)
    capture.active = True
    handle = layers[final].register_forward_hook(_DropAfterLayer(capture, final, config.rate), with_kwargs=True)
    return {"capture": capture, "handles": [handle], "methods": {}}


# --------------------------------------------------------------------------------------------
# LLaVA and LLaVA-Next: select image features, shrink the placeholders


def _llava_parts(model: torch.nn.Module):
    """(bare Llava*Model, is_next) for a supported LLaVA model."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaNextModel

    if isinstance(model, (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)):
        model = model.model
    return model, isinstance(model, LlavaNextModel)


def _anyres_layout(image_size, pinpoints, tile: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """Sub-image grid (nh, nw) of one LLaVA-Next image and its content box in the padded canvas.

    Mirrors the image processor: the image is resized into the best pinpoint resolution keeping its
    aspect ratio and centred with padding; the full image is the unpadded image, squashed.
    """
    from transformers.image_processing_utils import select_best_resolution

    h, w = (int(x) for x in image_size)
    best_h, best_w = select_best_resolution((h, w), pinpoints)
    if best_w / w < best_h / h:
        new_h, new_w = min(math.ceil(h * best_w / w), best_h), best_w
    else:
        new_h, new_w = best_h, min(math.ceil(w * best_h / h), best_w)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    return (best_h // tile, best_w // tile), (top / best_h, left / best_w, new_h / best_h, new_w / best_w)


def hired_image_features(model: torch.nn.Module, pixel_values: torch.Tensor, image_sizes=None,
                         vision_feature_layer=None, vision_feature_select_strategy=None):
    """Image features after HiRED for a LLaVA / LLaVA-Next model that ``apply_hired`` has wrapped.

    pixel_values: LLaVA (I, C, H, W); LLaVA-Next (I, P_max, C, H, W) or (sum P, C, H, W) with
    image_sizes (I, 2) as the processor returns them. Returns (features, original_lengths,
    kept_lengths): ``features`` a list of I (kept_i, D_text) tensors in the projector's output
    dtype, the lengths as lists of ints (placeholder tokens the stock model needs, and after
    dropping).
    """
    state = _state(model)
    if state is None:
        raise CompressError("hired_image_features needs a model that apply_hired has wrapped")
    config: HiredConfig = state["config"]
    base, is_next = _llava_parts(model)
    vfl = base.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = vision_feature_select_strategy or base.config.vision_feature_select_strategy
    if strategy != "default":
        raise CompressError(f"HiRED needs vision_feature_select_strategy 'default' (CLS dropped), got {strategy!r}")
    if is_next:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tile = base.config.vision_config.image_size
        parts = [image_size_to_num_patches(s, base.config.image_grid_pinpoints, tile) for s in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:p] for pv, p in zip(pixel_values, parts)], dim=0)
    else:
        parts = [1] * pixel_values.shape[0]
    capture: _QKCapture = state["capture"]
    capture.active = True
    try:
        out = base.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        final = capture.attention(state["final"])                                  # (sum P, N)
        initial = capture.attention(state["initial"]) if is_next else None
    finally:
        capture.active = False
        capture.store.clear()
    layers = [vfl] if isinstance(vfl, int) else list(vfl)
    hidden = torch.cat([out.hidden_states[i][:, 1:] for i in layers], dim=-1)      # (sum P, N, D_vis)
    feats = base.multi_modal_projector(hidden)                                     # (sum P, N, D)
    n = feats.shape[1]
    masks = []
    for i, (fa, p) in enumerate(zip(final.split(parts), parts)):
        grid, content = (None, (0.0, 0.0, 1.0, 1.0))
        if p > 1:
            grid, content = _anyres_layout(image_sizes[i], base.config.image_grid_pinpoints, tile)
        init = initial.split(parts)[i] if is_next else None
        mask = torch.zeros(p, n, dtype=torch.bool, device=feats.device)
        for j, idx in enumerate(hired_keep_indices(fa, config, init, grid, content)):
            mask[j, idx.to(feats.device)] = True
        masks.append(mask)
    if not is_next:
        kept = [f[m[0]] for f, m in zip(feats, masks)]
        return kept, [n] * len(kept), [len(k) for k in kept]
    # Pack with the keep-mask as one more channel, so the stock unpad/newline logic moves the mask
    # together with the features and the stock placeholder count comes out as the packed length.
    flagged = [torch.cat([f, m[..., None].to(f.dtype)], dim=-1) for f, m in zip(feats.split(parts), masks)]
    newline = torch.cat([base.image_newline, base.image_newline.new_full((1,), float(config.image_newline))])
    packed, _ = base.pack_image_features(flagged, image_sizes, strategy, image_newline=newline)
    kept = [p[p[:, -1] > 0.5, :-1] for p in packed]
    return kept, [p.shape[0] for p in packed], [k.shape[0] for k in kept]


def shrink_placeholders(input_ids: torch.Tensor, image_token_id: int, original_lengths: list[int],
                        kept_lengths: list[int], attention_mask: torch.Tensor | None = None,
                        per_position: dict[str, tuple[torch.Tensor, int]] | None = None, pad_token_id: int = 0):
    """Keep the first ``kept_lengths[i]`` placeholders of image i and drop the rest.

    input_ids: (B, T) int64 holding sum(original_lengths) ``image_token_id`` tokens; images are
    taken in row-major order, as the stock models scatter features. attention_mask: (B, T) or
    None. per_position: other (B, T, ...) tensors to shrink the same way, with their pad value.
    Padding is dropped with the placeholders, then rows are padded again to the new longest one on
    the side the mask padded (left when it cannot tell, as generation needs). Returns (input_ids,
    attention_mask, per_position) shrunk; the mask stays None if it was None and the rows stay
    equally long.
    """
    batch, length = input_ids.shape
    is_image = input_ids == image_token_id
    found, needed = int(is_image.sum()), int(sum(original_lengths))
    if found != needed:
        raise CompressError(f"input_ids hold {found} image placeholder tokens but the images need {needed}")
    device = input_ids.device
    orig = torch.tensor(original_lengths, device=device)
    new = torch.tensor(kept_lengths, device=device)
    owner = torch.repeat_interleave(torch.arange(len(original_lengths), device=device), orig)
    rank = torch.arange(needed, device=device) - (orig.cumsum(0) - orig)[owner]     # place in its run
    keep = ~is_image
    keep.view(-1)[is_image.view(-1).nonzero().squeeze(1)[rank < new[owner]]] = True
    if attention_mask is not None:
        keep &= attention_mask.bool()  # old padding goes too: rows are re-padded to the new longest
    lengths = keep.sum(dim=1)
    width = int(lengths.max())
    right = attention_mask is not None and bool((attention_mask[:, -1] == 0).any()) \
        and not bool((attention_mask[:, 0] == 0).any())
    dest = keep.cumsum(dim=1) - 1 + (0 if right else (width - lengths)[:, None])
    rows = torch.arange(batch, device=device)[:, None].expand(batch, length)[keep]
    cols = dest[keep]

    def move(t: torch.Tensor, fill) -> torch.Tensor:
        out = t.new_full((batch, width, *t.shape[2:]), fill)
        out[rows, cols] = t[keep]
        return out

    if attention_mask is None and bool((lengths != width).any()):
        attention_mask = torch.ones_like(input_ids)
    mask = None if attention_mask is None else move(attention_mask, 0)
    moved = {k: (None if t is None else move(t, fill)) for k, (t, fill) in (per_position or {}).items()}
    return move(input_ids, pad_token_id), mask, moved


def _prepare_llava_inputs(model: torch.nn.Module, kwargs: dict) -> dict:
    """Replace pixel_values by HiRED's features and shrink the per-token inputs to match."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if kwargs.get("mm_encoder_outputs"):
        raise CompressError("pass either pixel_values or mm_encoder_outputs to a HiRED model, not both")
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        raise CompressError("HiRED needs input_ids (not inputs_embeds) to find the image placeholder tokens")
    base, _ = _llava_parts(model)
    feats, orig, new = hired_image_features(
        model, kwargs.pop("pixel_values"), kwargs.pop("image_sizes", None),
        kwargs.pop("vision_feature_layer", None), kwargs.pop("vision_feature_select_strategy", None))
    image_token = base.config.image_token_id
    pad = base.config.text_config.pad_token_id
    pad = 0 if pad is None else pad
    pad = pad if pad != image_token else image_token + 1
    extra = {k: (kwargs.get(k), fill) for k, fill in (("labels", -100), ("position_ids", 1), ("token_type_ids", 0))
             if kwargs.get(k) is not None}
    ids, mask, moved = shrink_placeholders(input_ids, image_token, orig, new, kwargs.get("attention_mask"), extra, pad)
    kwargs.update(input_ids=ids, attention_mask=mask, **moved)
    kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    return kwargs


def _has_pixels(kwargs: dict) -> bool:
    pixels = kwargs.get("pixel_values")
    return pixels is not None and pixels.shape[0] > 0


def _apply_llava(model: torch.nn.Module, config: HiredConfig) -> dict:
    base, is_next = _llava_parts(model)
    tower = base.vision_tower
    layers, attn_name = _encoder_layers(tower)
    vfl = base.config.vision_feature_layer
    deepest = max(vfl, key=lambda i: i % (len(layers) + 1)) if isinstance(vfl, (list, tuple)) else vfl
    if config.final_layer is not None:
        final = config.final_layer
    elif deepest % (len(layers) + 1) == 0:
        raise CompressError("vision_feature_layer 0 is the embedding output; set hired final_layer explicitly")
    else:
        final = deepest if deepest < 0 else deepest - 1  # hidden_states[h] is the output of layer h - 1
    final = _resolve_layer(final, len(layers), "final_layer")
    initial = _resolve_layer(config.initial_layer, len(layers), "initial_layer")
    used = {final, initial} if is_next else {final}  # the initial layer only splits sub-image budgets
    capture = _QKCapture({i: getattr(layers[i], attn_name) for i in used}, config.head_reduce)
    state = {"capture": capture, "handles": [], "methods": {}, "final": final, "initial": initial}

    state["methods"]["forward"] = _wrap_method(model, "forward", _hired_forward)
    if hasattr(model, "generate"):
        state["methods"]["generate"] = _wrap_method(model, "generate", _hired_generate)
    return state


def _wrap_method(model: torch.nn.Module, name: str, impl):
    """Install ``impl(self, original, *args, **kwargs)`` as ``model.<name>``; returns what it shadows.

    The wrapper is bound with ``types.MethodType`` so a deep copy of the model calls its own copy, and
    it carries the original's signature (``generate`` inspects ``forward``'s parameters).
    """
    shadowed = model.__dict__.get(name)  # e.g. an accelerate hook's forward; None for the class's
    unbound = getattr(type(model), name)

    @functools.wraps(unbound)
    def method(self, *args, **kwargs):
        original = shadowed if shadowed is not None else functools.partial(unbound, self)
        return impl(self, original, *args, **kwargs)

    model.__dict__[name] = types.MethodType(method, model)
    return shadowed


def _hired_forward(model, forward, *args, **kwargs):
    params = inspect.signature(type(model).forward).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    kwargs.update(zip(names, args))
    if _has_pixels(kwargs):
        kwargs = _prepare_llava_inputs(model, kwargs)
    return forward(**kwargs)


def _hired_generate(model, generate, *args, **kwargs):
    if len(args) > 1:
        raise CompressError("a HiRED model's generate takes input_ids as its only positional argument")
    if args or "inputs" in kwargs:
        kwargs["input_ids"] = args[0] if args else kwargs.pop("inputs")
    if not _has_pixels(kwargs):
        return generate(**kwargs)
    prompt = kwargs["input_ids"]
    kwargs = _prepare_llava_inputs(model, kwargs)
    short = kwargs["input_ids"].shape[1]
    if kwargs.get("max_length") is not None:
        kwargs["max_length"] -= prompt.shape[1] - short
    out = generate(**kwargs)
    # hand back the caller's prompt, so that slicing off len(prompt) works as with the stock model
    seqs = out if isinstance(out, torch.Tensor) else out.sequences
    repeat = seqs.shape[0] // prompt.shape[0]
    restored = torch.cat([prompt.repeat_interleave(repeat, 0).to(seqs.device), seqs[:, short:]], dim=1)
    if isinstance(out, torch.Tensor):
        return restored
    out.sequences = restored
    return out


# --------------------------------------------------------------------------------------------
# Public entry points


def _state(model: torch.nn.Module) -> dict | None:
    return model.__dict__.get(_STATE_ATTR)


def hired_config_of(model: torch.nn.Module) -> HiredConfig | None:
    """The HiredConfig that ``apply_hired`` put on ``model``, or None."""
    state = _state(model)
    return None if state is None else state["config"]


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
    if _state(model) is not None:
        raise CompressError(f"HiRED is already applied to this {type(model).__name__}; call remove_hired first")
    if isinstance(model, (ViTModel, ViTForImageClassification, CLIPVisionModel, CLIPVisionModelWithProjection)):
        state = _apply_encoder(model, config)
    elif isinstance(model, (LlavaModel, LlavaForConditionalGeneration, LlavaNextModel,
                            LlavaNextForConditionalGeneration)):
        state = _apply_llava(model, config)
    else:
        raise CompressError(f"HiRED does not support {type(model).__name__}; supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    state["config"] = config
    model.__dict__[_STATE_ATTR] = state
    return model


def remove_hired(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply_hired``: remove its hooks and wrapped methods; returns ``model``."""
    state = model.__dict__.pop(_STATE_ATTR, None)
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
