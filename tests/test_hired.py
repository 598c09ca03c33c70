"""HiRED token dropping against a plain reference that materialises full (eager) attention maps.

Models are tiny random configurations in float64, so the reference's eager attention and the
library's SDPA path agree to ~1e-15 and top-k choices can only differ on exact ties.
"""
import copy
import math

import pytest
import torch
from transformers import (BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          SiglipVisionConfig, ViTConfig, ViTForImageClassification)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from compress.errors import CompressError
from compress.hired import (SUPPORTED_ARCHITECTURES, HiredConfig, apply_hired, apportion, hired_config_of,
                            hired_image_features, hired_keep_indices, partition_budgets, region_weights,
                            remove_hired, row_band_weights, shrink_placeholders, token_budget)
from compress.hired.encoder import default_drop_layer
from compress.hired.llava import _anyres_layout

F64 = torch.float64


# ------------------------------------------------------------------------------------------ reference


def ref_cls_attention(attentions, layer, reduce="sum"):
    """(B, N) from materialised (B, H, T, T) attention maps: CLS row, patch columns, heads reduced."""
    row = attentions[layer][:, :, 0, 1:]
    return row.sum(1) if reduce == "sum" else row.amax(1)


def ref_region_weights(att, nh, nw, content):
    gh, gw = att.shape
    top, left, hgt, wid = content
    out = torch.zeros(nh * nw, dtype=F64)
    for r in range(gh):
        for c in range(gw):
            y0, y1 = top + hgt * r / gh, top + hgt * (r + 1) / gh
            x0, x1 = left + wid * c / gw, left + wid * (c + 1) / gw
            for i in range(nh):
                for j in range(nw):
                    oy = max(0.0, min(y1, (i + 1) / nh) - max(y0, i / nh))
                    ox = max(0.0, min(x1, (j + 1) / nw) - max(x0, j / nw))
                    out[i * nw + j] += float(att[r, c]) * oy * ox / ((y1 - y0) * (x1 - x0))
    return out


def ref_apportion(w, total, cap):
    """Capped proportional split by repeated capping, then largest remainders, with plain loops."""
    w = [max(0.0, float(x)) for x in w]
    fixed = {}
    while True:
        free = [i for i in range(len(w)) if i not in fixed]
        rest = total - sum(fixed.values())
        mass = sum(w[i] for i in free)
        q = {i: rest * (w[i] / mass if mass > 0 else 1 / len(free)) for i in free}
        over = [i for i in free if q[i] > cap]
        if not over:
            break
        for i in over:
            fixed[i] = cap
    quota = [fixed.get(i, q.get(i, 0.0)) for i in range(len(w))]
    shares = [min(cap, math.floor(x)) for x in quota]
    by_rem = sorted((i for i in range(len(w)) if shares[i] < cap), key=lambda i: (-(quota[i] - shares[i]), i))
    for i in by_rem[: total - sum(shares)]:
        shares[i] += 1
    return shares


def ref_keep(final, initial, cfg, grid=None, content=(0.0, 0.0, 1.0, 1.0)):
    """Reference kept indices for one image of P partitions, (P, N) attentions."""
    parts, n = final.shape
    total = max(1, math.floor(parts * n * cfg.rate + 1e-9))
    if parts == 1:
        budgets = [total]
    else:
        full = min(math.floor(cfg.alpha * total + 1e-9), n)
        sub = total - full
        if sub > (parts - 1) * n:
            full, sub = full + sub - (parts - 1) * n, (parts - 1) * n
        side = math.isqrt(n)
        weights = ref_region_weights(initial[0].view(side, side), grid[0], grid[1], content)
        budgets = [full] + ref_apportion(weights, sub, n)
    return [sorted(torch.argsort(final[p], descending=True)[:k].tolist()) for p, k in enumerate(budgets)]


def ref_content(image_size, pinpoints):
    from transformers.image_processing_utils import select_best_resolution
    h, w = image_size
    bh, bw = select_best_resolution((h, w), pinpoints)
    sw, sh = bw / w, bh / h
    nh, nw = (min(math.ceil(h * sw), bh), bw) if sw < sh else (bh, min(math.ceil(w * sh), bw))
    return ((bh - nh) // 2 / bh, (bw - nw) // 2 / bw, nh / bh, nw / bw)


def eager_copy(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


# ------------------------------------------------------------------------------------------ models


def tiny_vit(seed=0, impl="sdpa"):
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=40, image_size=20,
                    patch_size=4, num_channels=1, num_labels=7, attn_implementation=impl)
    return ViTForImageClassification(cfg).to(F64).eval()


def tiny_clip_config(**kw):
    return CLIPVisionConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=40,
                            image_size=16, patch_size=4, projection_dim=8, **kw)


def tiny_text_config():
    return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=48, vocab_size=64, pad_token_id=0)


def tiny_llava_next(seed=0):
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=tiny_clip_config(), text_config=tiny_text_config(), image_token_id=63,
                          image_grid_pinpoints=[[16, 32], [32, 16], [32, 32], [16, 48]], vision_feature_layer=-2)
    return LlavaNextForConditionalGeneration(cfg).to(F64).eval()


def prompt(lengths, image_token, before=3, after=4, seed=0):
    """Left-padded (B, T) ids with one image run per row, and its attention mask."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(1, image_token, (before,), generator=gen), torch.full((n,), image_token),
                       torch.randint(1, image_token, (after,), generator=gen)]) for n in lengths]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": 0.0}, "hired rate must be in (0, 1], got 0.0"),
    ({"rate": 1.5}, "hired rate must be in (0, 1], got 1.5"),
    ({"rate": float("nan")}, "hired rate must be a number, got nan"),
    ({"rate": "0.2"}, "hired rate must be a number, got '0.2'"),
    ({"alpha": -0.1}, "hired alpha must be in [0, 1], got -0.1"),
    ({"final_layer": 1.5}, "hired final_layer must be an integer layer index, got 1.5"),
    ({"head_reduce": "mean"}, "hired head_reduce must be one of ('sum', 'max'), got 'mean'"),
    ({"allocation": "bands"}, "hired allocation must be one of ('region', 'row_bands'), got 'bands'"),
    ({"image_newline": 1}, "hired image_newline must be true or false, got 1"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(CompressError) as err:
        HiredConfig(**kwargs)
    assert str(err.value) == message


def test_config_round_trip_and_unknown_keys():
    cfg = HiredConfig(rate=0.4, alpha=0.3, final_layer=-3, head_reduce="max", allocation="row_bands")
    d = cfg.to_dict()
    assert d["method"] == "hired" and d["rate"] == 0.4
    assert HiredConfig.from_dict(d) == cfg
    with pytest.raises(CompressError, match=r"unknown keys \['budget', 'layers'\]"):
        HiredConfig.from_dict({"method": "hired", "budget": 0.2, "layers": [0, -2]})
    with pytest.raises(CompressError, match="token_dropping method 'tome' is not supported"):
        HiredConfig.from_dict({"method": "tome"})


# ------------------------------------------------------------------------------------------ budgets


def test_budgets_add_up_and_match_reference():
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        side = int(torch.randint(2, 9, (1,), generator=gen))
        nh, nw = (int(x) for x in torch.randint(1, 4, (2,), generator=gen))
        parts, n = 1 + nh * nw, side * side
        cfg = HiredConfig(rate=float(torch.rand(1, generator=gen)) * 0.99 + 0.01,
                          alpha=float(torch.rand(1, generator=gen)))
        att = torch.rand(side, side, generator=gen, dtype=F64) ** 3
        content = (0.0, 0.0, 1.0, 1.0) if trial % 2 else (0.125, 0.0, 0.75, 1.0)
        w = region_weights(att, (nh, nw), content)
        assert torch.allclose(w, ref_region_weights(att, nh, nw, content), atol=1e-12)
        budgets = partition_budgets(parts, n, cfg, w)
        assert sum(budgets) == token_budget(parts, n, cfg.rate) == max(1, math.floor(parts * n * cfg.rate + 1e-9))
        assert all(0 <= b <= n for b in budgets)
        assert budgets[1:] == ref_apportion(w, sum(budgets[1:]), n)
    # the whole image's attention lands somewhere in the sub-images when nothing is padded
    att = torch.rand(6, 6, dtype=F64)
    assert torch.isclose(region_weights(att, (2, 3)).sum(), att.sum())


def test_keep_indices_match_reference_and_keep_raster_order():
    gen = torch.Generator().manual_seed(2)
    for trial in range(30):
        side = int(torch.randint(2, 7, (1,), generator=gen))
        nh, nw = (int(x) for x in torch.randint(1, 4, (2,), generator=gen))
        parts, n = (1 if trial % 5 == 0 else 1 + nh * nw), side * side
        cfg = HiredConfig(rate=float(torch.rand(1, generator=gen)) * 0.9 + 0.1, alpha=0.5)
        final = torch.rand(parts, n, generator=gen, dtype=F64)
        initial = torch.rand(parts, n, generator=gen, dtype=F64)
        content = (0.0, 0.1, 1.0, 0.8)
        got = hired_keep_indices(final, cfg, initial, (nh, nw), content)
        assert [g.tolist() for g in got] == ref_keep(final, initial, cfg, (nh, nw), content)


@pytest.mark.parametrize("height, width", [(16, 36), (20, 30), (40, 12), (12, 40), (16, 48)])
def test_anyres_content_box_matches_image_processor(height, width):
    """The full image's place in the padded canvas, against where the processor puts the pixels."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    pins = [[16, 32], [32, 16], [32, 32], [16, 48]]
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                      image_grid_pinpoints=pins, do_normalize=False, do_rescale=False)
    import numpy as np
    pv = proc(images=np.full((height, width, 3), 200, dtype=np.uint8), return_tensors="pt").pixel_values[0]
    (nh, nw), (top, left, hgt, wid) = _anyres_layout((height, width), pins, 16)
    tiles = pv[1:1 + nh * nw, 0] > 0                                                  # (nh * nw, 16, 16)
    canvas = tiles.view(nh, nw, 16, 16).permute(0, 2, 1, 3).reshape(nh * 16, nw * 16)
    rows, cols = canvas.any(1).nonzero().squeeze(1), canvas.any(0).nonzero().squeeze(1)
    assert (round(top * nh * 16), round(hgt * nh * 16)) == (int(rows[0]), len(rows))
    assert (round(left * nw * 16), round(wid * nw * 16)) == (int(cols[0]), len(cols))


def test_budget_rules_by_hand():
    assert token_budget(1, 100, 0.29) == 29  # 100 * 0.29 = 28.999... in floating point
    assert token_budget(5, 576, 0.2) == 576 and token_budget(1, 10, 0.01) == 1
    assert partition_budgets(1, 16, HiredConfig(rate=0.5)) == [8]
    # 2 partitions, alpha 0.1, rate 1: the sub-image is full, its overflow goes back to the full image
    assert partition_budgets(2, 16, HiredConfig(rate=1.0, alpha=0.1), torch.tensor([1.0])) == [16, 16]
    # weights 3 : 1 over 6 tokens with cap 4 -> 4.5 capped to 4, the other gets 2
    assert apportion(torch.tensor([3.0, 1.0]), 6, 4) == [4, 2]
    assert apportion(torch.tensor([0.0, 0.0, 0.0]), 4, 2) == [2, 1, 1]


def test_row_bands_follow_released_code():
    att = torch.tensor([9, 1, 8, 2, 7, 3, 6, 5], dtype=F64)            # N = 8, top 4 at 0, 2, 4, 6
    w = row_band_weights(att, 4, alpha=0.5)
    assert w.tolist() == [1.0, 1.0, 1.0, 1.0]
    cfg = HiredConfig(rate=0.3, alpha=0.5, allocation="row_bands")
    # P = 5, B = floor(40 * 0.3) = 12, full 6, sub 6 -> floor(6 / 4) = 1 each: 10, not 12
    assert partition_budgets(5, 8, cfg, w) == [6, 1, 1, 1, 1]
    with pytest.raises(CompressError, match="row_bands allocation needs N=8 patch tokens divisible by 3"):
        row_band_weights(att, 3, 0.5)


# ------------------------------------------------------------------------------------------ encoders


@pytest.mark.parametrize("impl, reduce, layer", [("sdpa", "sum", 1), ("eager", "max", 0), ("sdpa", "sum", -1)])
def test_vit_drops_after_layer_like_reference(impl, reduce, layer):
    model = tiny_vit(impl=impl)
    ref = eager_copy(model)
    pixels = torch.randn(3, 1, 20, 20, dtype=F64)
    cfg = HiredConfig(rate=0.3, final_layer=layer, head_reduce=reduce)
    with torch.no_grad():
        out = ref.vit(pixels, output_attentions=True, output_hidden_states=True)
        scores = ref_cls_attention(out.attentions, layer, reduce)                      # (B, 25)
        k = math.floor(25 * 0.3)
        keep = [[0] + [1 + j for j in sorted(torch.argsort(s, descending=True)[:k].tolist())] for s in scores]
        hidden = torch.stack([h[idx] for h, idx in zip(out.hidden_states[layer % 3 + 1], keep)])
        for block in ref.vit.layers[layer % 3 + 1:]:
            hidden = block(hidden)
        ref_logits = ref.classifier(ref.vit.layernorm(hidden)[:, 0])
        apply_hired(model, cfg)
        got = model(pixels, output_hidden_states=True)
    assert torch.allclose(got.logits, ref_logits, atol=1e-10)
    assert got.hidden_states[-1].shape == (3, 1 + k, 24)
    assert hired_config_of(model) == cfg


def test_clip_vision_keeps_cls_and_sorted_tokens():
    torch.manual_seed(3)
    model = CLIPVisionModel(tiny_clip_config(attn_implementation="sdpa")).to(F64).eval()
    ref = eager_copy(model)
    pixels = torch.randn(2, 3, 16, 16, dtype=F64)
    with torch.no_grad():
        full = ref(pixels, output_attentions=True)
        apply_hired(model, HiredConfig(rate=0.5, final_layer=-1))
        got = model(pixels)
    scores = ref_cls_attention(full.attentions, -1)
    for b in range(2):
        keep = [0] + [1 + j for j in sorted(torch.argsort(scores[b], descending=True)[:8].tolist())]
        assert torch.allclose(got.last_hidden_state[b], full.last_hidden_state[b, keep], atol=1e-10)
    assert torch.allclose(got.pooler_output, full.pooler_output, atol=1e-10)


def test_default_layer_rule():
    assert [default_drop_layer(n) for n in (1, 2, 3, 4, 6, 12, 24)] == [0, 0, 0, 1, 2, 5, 11]


def tokens_per_layer(out):
    """Tokens each encoder layer received: the lengths of hidden_states[0 .. L - 1]."""
    return [h.shape[1] for h in out.hidden_states[:-1]]


def encoder_flops(model, pixels):
    """FLOPs of one forward, counted on an eager copy (torch's counter does not see CPU SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(pixels)
    finally:
        model.set_attn_implementation("sdpa")
    return counter.get_total_flops()


def test_default_drops_half_way_where_it_saves_work():
    """A ViT classifier reads only CLS: after the last layer nothing changes; the default saves work."""
    torch.manual_seed(4)
    cfg = ViTConfig(hidden_size=24, num_hidden_layers=4, num_attention_heads=3, intermediate_size=40, image_size=20,
                    patch_size=4, num_channels=1, num_labels=7, attn_implementation="sdpa")
    model = ViTForImageClassification(cfg).to(F64).eval()
    pixels = torch.randn(3, 1, 20, 20, dtype=F64)
    with torch.no_grad():
        stock = model(pixels).logits
        stock_flops = encoder_flops(model, pixels)
        apply_hired(model, HiredConfig(rate=0.2, final_layer=-1))
        assert torch.allclose(model(pixels).logits, stock, atol=1e-12)     # the old default: nothing saved
        remove_hired(model)
        apply_hired(model, HiredConfig(rate=0.2, final_layer=1))
        explicit = model(pixels).logits
        remove_hired(model)
        apply_hired(model, HiredConfig(rate=0.2))                           # default: after layer 4 // 2 - 1
        out = model(pixels, output_hidden_states=True)
        flops = encoder_flops(model, pixels)
    assert tokens_per_layer(out) == [26, 26, 6, 6]                          # CLS + floor(25 * 0.2)
    assert torch.equal(out.logits, explicit) and not torch.allclose(out.logits, stock)
    assert flops < 0.65 * stock_flops
    clip = CLIPVisionModel(tiny_clip_config(attn_implementation="sdpa")).to(F64).eval()
    clip_pixels = torch.randn(2, 3, 16, 16, dtype=F64)
    with torch.no_grad():
        apply_hired(clip, HiredConfig(rate=0.5))                            # 3 layers: after layer 0
        out = clip(clip_pixels, output_hidden_states=True)
    assert tokens_per_layer(out) == [17, 9, 9]


def kept_rows(before, after):
    """Which rows of ``before`` (B, T, D) each row of ``after`` (B, K, D) is (HiRED copies them)."""
    return [[next(j for j in range(b.shape[0]) if torch.equal(b[j], row)) for row in a] for b, a in zip(before, after)]


def finish_from(model, kind, hidden, layer):
    """Run the float64 layers after ``layer`` on ``hidden`` (B, K, D): ViT logits or CLIP pooler output."""
    if kind == "vit":
        for block in model.vit.layers[layer + 1:]:
            hidden = block(hidden)
        return model.classifier(model.vit.layernorm(hidden)[:, 0])
    for block in model.encoder.layers[layer + 1:]:
        out = block(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.post_layernorm(hidden[:, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_encoders_in_half_precision(kind, dtype):
    """fp16 / bf16 models keep float64's top tokens (up to ties within the dtype's rounding), CLS first and
    in raster order, and their outputs, in the model's dtype, match float64 run on the same tokens."""
    torch.manual_seed(6)
    if kind == "vit":  # a wide init spreads the CLS attention, so the top-k check below has teeth
        wide = ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=40,
                         image_size=20, patch_size=4, num_channels=1, num_labels=7, initializer_range=0.5)
        model, pixels = ViTForImageClassification(wide).to(F64).eval(), torch.randn(3, 1, 20, 20, dtype=F64)
    else:
        model = CLIPVisionModel(tiny_clip_config(initializer_range=0.5, initializer_factor=3.0)).to(F64).eval()
        pixels = torch.randn(3, 3, 16, 16, dtype=F64)
    half = copy.deepcopy(model).to(dtype)
    layer, n = 1, (25 if kind == "vit" else 16)
    tie, close = (0.02, 0.01) if dtype == torch.float16 else (0.1, 0.05)     # bf16 keeps 8 bits of mantissa
    with torch.no_grad():
        scores = ref_cls_attention(eager_copy(model)(pixels, output_attentions=True).attentions, layer)   # (B, N)
        # output_hidden_states before apply_hired: transformers' recorder hooks are installed first and
        # must still record the layer's output after the drop
        stock64 = model(pixels, output_hidden_states=True).hidden_states[layer + 1]                 # (B, 1 + N, D)
        stock = half(pixels.to(dtype), output_hidden_states=True).hidden_states[layer + 1]
        apply_hired(half, HiredConfig(rate=0.3, final_layer=layer))
        got = half(pixels.to(dtype), output_hidden_states=True)
        kept = kept_rows(stock, got.hidden_states[layer + 1])
        want = finish_from(model, kind, torch.stack([h[k] for h, k in zip(stock64, kept)]), layer)
    assert got.hidden_states[layer + 1].dtype == dtype
    assert all(len(row) == 1 + math.floor(n * 0.3) and row[0] == 0 and row == sorted(row) for row in kept)
    for score, row in zip(scores, kept):
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[[j - 1 for j in row[1:]]] = True
        assert float(score[chosen].min()) >= float(score[~chosen].max()) - tie
    out = got.logits if kind == "vit" else got.pooler_output
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert float((out.double() - want).norm() / want.norm()) < close


def test_remove_restores_stock_outputs_and_double_apply_fails():
    model = tiny_vit()
    pixels = torch.randn(2, 1, 20, 20, dtype=F64)
    with torch.no_grad():
        stock = model(pixels).logits
        apply_hired(model, HiredConfig(rate=0.2, final_layer=0))
        assert not torch.allclose(model(pixels).logits, stock)
        with pytest.raises(CompressError, match="HiRED is already applied to this ViTForImageClassification"):
            apply_hired(model, HiredConfig())
        remove_hired(model)
        assert torch.equal(model(pixels).logits, stock)
    with pytest.raises(CompressError, match="HiRED is not applied to this ViTForImageClassification"):
        remove_hired(model)


def test_deepcopy_of_a_wrapped_model_is_independent():
    vit = apply_hired(tiny_vit(), HiredConfig(rate=0.3, final_layer=1))
    pixels = torch.randn(2, 1, 20, 20, dtype=F64)
    twin = copy.deepcopy(vit)
    with torch.no_grad():
        assert torch.equal(twin(pixels).logits, vit(pixels).logits)
        remove_hired(vit)
        assert not torch.equal(twin(pixels).logits, vit(pixels).logits)   # the copy still drops tokens
    llava = apply_hired(tiny_llava_next(), HiredConfig(rate=0.3))
    sizes, pv = torch.tensor([[20, 30]]), torch.randn(1, 5, 3, 16, 16, dtype=F64)
    clone = copy.deepcopy(llava)
    with torch.no_grad():
        ids, _ = prompt(hired_image_features(llava, pv, sizes)[1], 63)
        clone.lm_head.weight.add_(0.01)           # a copy that runs itself, not the original, differs
        a = llava(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits
        b = clone(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits
    assert a.shape == b.shape and not torch.allclose(a, b)
    remove_hired(clone)
    assert hired_config_of(llava) is not None and "forward" not in clone.__dict__


def test_bad_models_and_layers():
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(CompressError) as err:
        apply_hired(bert, HiredConfig())
    assert str(err.value).startswith("HiRED does not support BertModel; supported: ViTModel, ")
    assert all(name in str(err.value) for name in SUPPORTED_ARCHITECTURES)
    with pytest.raises(CompressError, match="hired final_layer=5 is out of range for a 3-layer vision encoder"):
        apply_hired(tiny_vit(), HiredConfig(final_layer=5))
    siglip = SiglipVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                image_size=16, patch_size=4)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=siglip, text_config=tiny_text_config(),
                                                      image_token_id=63))
    with pytest.raises(CompressError, match="HiRED needs a vision encoder with a CLS token; SiglipVisionModel"):
        apply_hired(llava, HiredConfig())


# ------------------------------------------------------------------------------------------ LLaVA


def ref_llava_next_features(model, pixels, sizes, cfg):
    """Kept features per image, built from eager attention maps and an explicit packing."""
    ref = eager_copy(model)
    base = ref.model
    pins, tile = base.config.image_grid_pinpoints, base.config.vision_config.image_size
    flat, parts = [], []
    for pv, size in zip(pixels, sizes):
        nh, nw = get_anyres_image_grid_shape(size, pins, tile)
        parts.append(1 + nh * nw)
        flat.append(pv[: parts[-1]])
    out = base.vision_tower(torch.cat(flat), output_attentions=True, output_hidden_states=True)
    proj = base.multi_modal_projector(out.hidden_states[-2][:, 1:])                   # (sum P, N, D)
    final, initial = ref_cls_attention(out.attentions, 1), ref_cls_attention(out.attentions, 0)
    n, g = proj.shape[1], math.isqrt(proj.shape[1])
    feats, lengths, start = [], [], 0
    for p, size in zip(parts, sizes):
        nh, nw = get_anyres_image_grid_shape(size, pins, tile)
        keep = ref_keep(final[start:start + p], initial[start:start + p], cfg, (nh, nw),
                        ref_content(size.tolist(), pins))
        rows = [proj[start, j] for j in keep[0]]                                       # full image, raster order
        canvas = torch.arange(nh * g * nw * g).view(1, nh * g, nw * g)
        canvas = unpad_image(canvas, size)[0]
        for line in canvas:
            for flat_pos in line.tolist():
                r, c = divmod(flat_pos, nw * g)
                part, tok = 1 + (r // g) * nw + c // g, (r % g) * g + c % g
                if tok in keep[part]:
                    rows.append(proj[start + part, tok])
            if cfg.image_newline:
                rows.append(base.image_newline)
        feats.append(torch.stack(rows))
        lengths.append(n + canvas.numel() + canvas.shape[0])
        start += p
    return feats, lengths


@pytest.mark.parametrize("newline", [False, True])
def test_llava_next_forward_and_generate_match_reference(newline):
    model = tiny_llava_next()
    sizes = torch.tensor([[20, 30], [40, 12], [16, 48]])   # 2x2 and 2x1 grids with padding, 1x3 without
    pixels = torch.randn(3, 5, 3, 16, 16, dtype=F64)
    cfg = HiredConfig(rate=0.3, image_newline=newline)
    with torch.no_grad():
        stock_lengths = [f.shape[0] for f in model.model.get_image_features(pixels, sizes).pooler_output]
        ref_feats, ref_lengths = ref_llava_next_features(model, pixels, sizes, cfg)
        assert ref_lengths == stock_lengths
        ids, mask = prompt(stock_lengths, 63)
        short_ids, short_mask = prompt([len(f) for f in ref_feats], 63)
        expected = model(input_ids=short_ids, attention_mask=short_mask,
                         mm_encoder_outputs={"image": _pooled(ref_feats)}).logits
        ref_gen = model.generate(input_ids=short_ids, attention_mask=short_mask, max_new_tokens=4, do_sample=False,
                                 mm_encoder_outputs={"image": _pooled(ref_feats)})
        apply_hired(model, cfg)
        feats, orig, kept = hired_image_features(model, pixels, sizes)
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes,
                             max_new_tokens=4, do_sample=False)
    assert orig == stock_lengths and kept == [len(f) for f in ref_feats]
    for a, b in zip(feats, ref_feats):
        assert torch.allclose(a, b, atol=1e-10)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-8)
    assert torch.equal(gen[:, : ids.shape[1]], ids)                      # the caller's prompt comes back
    assert torch.equal(gen[:, ids.shape[1]:], ref_gen[:, short_ids.shape[1]:])


def _pooled(feats):
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    return BaseModelOutputWithPooling(pooler_output=list(feats))


def test_llava_forward_matches_reference_with_labels():
    torch.manual_seed(5)
    cfg = LlavaConfig(vision_config=tiny_clip_config(attn_implementation="sdpa"), text_config=tiny_text_config(),
                      image_token_id=63, vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg).to(F64).eval()
    ref = eager_copy(model)
    pixels = torch.randn(2, 3, 16, 16, dtype=F64)
    hired = HiredConfig(rate=0.4)
    with torch.no_grad():
        out = ref.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        proj = ref.model.multi_modal_projector(out.hidden_states[-1][:, 1:])
        scores = ref_cls_attention(out.attentions, -1)
        feats = [proj[b, ref_keep(scores[b:b + 1], None, hired)[0]] for b in range(2)]
        ids, _ = prompt([16, 16], 63, seed=2)
        short, _ = prompt([6, 6], 63, seed=2)
        labels = ids.clone()
        labels[ids == 63] = -100
        expected = model(input_ids=short, labels=torch.where(short == 63, -100, short),
                         mm_encoder_outputs={"image": _pooled(feats)})
        apply_hired(model, hired)
        got = model(ids, pixels, labels=labels)
    assert torch.allclose(got.logits, expected.logits, atol=1e-8)
    assert torch.isclose(got.loss, expected.loss, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llava_next_in_half_precision(dtype):
    """fp16 / bf16 LLaVA-Next: features in the model's dtype, and forward / generate equal the stock model
    fed those features with the placeholders shrunk."""
    model = tiny_llava_next().to(dtype)
    sizes, pixels = torch.tensor([[20, 30], [40, 12]]), torch.randn(2, 5, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        apply_hired(model, HiredConfig(rate=0.3))
        feats, orig, kept = hired_image_features(model, pixels, sizes)
        ids, mask = prompt(orig, 63)
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes,
                             max_new_tokens=3, do_sample=False)
        remove_hired(model)
        short, short_mask = prompt(kept, 63)
        want = model(input_ids=short, attention_mask=short_mask, mm_encoder_outputs={"image": _pooled(feats)}).logits
        want_gen = model.generate(input_ids=short, attention_mask=short_mask, max_new_tokens=3, do_sample=False,
                                  mm_encoder_outputs={"image": _pooled(feats)})
    assert all(f.dtype == dtype for f in feats) and got.dtype == dtype
    assert torch.equal(got, want) and torch.isfinite(got).all()
    assert torch.equal(gen[:, ids.shape[1]:], want_gen[:, short.shape[1]:])


def test_shrink_placeholders_right_padding_and_errors():
    ids = torch.tensor([[5, 9, 9, 9, 9, 6, 9, 9, 7],
                        [5, 9, 9, 9, 6, 7, 0, 0, 0]])
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    labels = ids * 10
    new_ids, new_mask, moved = shrink_placeholders(ids, 9, [4, 2, 3], [1, 2, 0], mask, {"labels": (labels, -100)})
    assert new_ids.tolist() == [[5, 9, 6, 9, 9, 7], [5, 6, 7, 0, 0, 0]]
    assert new_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert moved["labels"].tolist() == [[50, 90, 60, 90, 90, 70], [50, 60, 70, -100, -100, -100]]
    # no mask given and rows shrink unequally: left padding and a mask are created
    new_ids, new_mask, _ = shrink_placeholders(ids[:, :6], 9, [4, 3], [4, 1], pad_token_id=0)
    assert new_ids.tolist() == [[5, 9, 9, 9, 9, 6], [0, 0, 5, 9, 6, 7]]
    assert new_mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    with pytest.raises(CompressError, match="input_ids hold 9 image placeholder tokens but the images need 8"):
        shrink_placeholders(ids, 9, [4, 4], [1, 1])
