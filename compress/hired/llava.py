"""HiRED for LLaVA and LLaVA-Next: select the image features, shrink the placeholder tokens to match.

The vision tower runs in full; the kept image features replace all of them before the language
model (which is where the work is saved), and ``input_ids`` (with ``attention_mask``, ``labels``,
``position_ids``) lose the placeholders of the dropped features inside the wrapped ``forward`` and
``generate``.
"""
from __future__ import annotations

import functools
import inspect
import math
import types

import torch

from compress.errors import CompressError

from .config import HiredConfig, wrapper_state
from .encoder import QKCapture, encoder_layers, resolve_layer
from .selection import hired_keep_indices


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
    state = wrapper_state(model)
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
    capture: QKCapture = state["capture"]
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


def apply_to_llava(model: torch.nn.Module, config: HiredConfig) -> dict:
    """Hook the vision tower's final (and, for LLaVA-Next, initial) layer and wrap forward / generate.

    The default final layer is the one whose output LLaVA reads (``vision_feature_layer``): the
    tokens are dropped before the language model, which is where the work is. Returns the wrapper
    state for ``apply_hired``.
    """
    base, is_next = _llava_parts(model)
    tower = base.vision_tower
    layers, attn_name = encoder_layers(tower)
    vfl = base.config.vision_feature_layer
    deepest = max(vfl, key=lambda i: i % (len(layers) + 1)) if isinstance(vfl, (list, tuple)) else vfl
    if config.final_layer is not None:
        final = config.final_layer
    elif deepest % (len(layers) + 1) == 0:
        raise CompressError("vision_feature_layer 0 is the embedding output; set hired final_layer explicitly")
    else:
        final = deepest if deepest < 0 else deepest - 1  # hidden_states[h] is the output of layer h - 1
    final = resolve_layer(final, len(layers), "final_layer")
    initial = resolve_layer(config.initial_layer, len(layers), "initial_layer")
    used = {final, initial} if is_next else {final}  # the initial layer only splits sub-image budgets
    capture = QKCapture({i: getattr(layers[i], attn_name) for i in used}, config.head_reduce)
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

