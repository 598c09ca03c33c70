"""Validating an exported graph against the PyTorch compressed model it came from.

The same inputs go through both: ``sample_batches`` as prompts and, for a graph with a key/value
cache, one decode step on top of the last prompt with PyTorch's own cache as the past. The outputs
are compared three ways (``compare``):

    rel_err   max |onnx - torch| / max |torch| over every output (logits, hidden states, caches)
    kl        mean over the non-padding query positions of KL(softmax(torch) || softmax(onnx)) in
              nats, from the logits of causal LMs (float64)
    top1      the fraction of those positions where both pick the same next token

A relative error alone hides what matters for a language model (a 3 % error on the logits can flip
one prediction in twenty), so causal LMs are held to a KL bound as well (``export_onnx``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Largest rel_err (max |onnx - torch| / max |torch|) accepted, per accuracy_level. Levels 0-3
# compute in float on the CPU; level 4 quantizes activations to int8 per block.
TOLERANCE = {0: 1e-3, 1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 5e-2}
# Largest mean KL(torch || onnx) in nats accepted for causal LMs, per accuracy_level: float compute
# is float rounding (measured ~1e-12 on stories260K); level 4 adds 3e-4 to 7e-4 there
# (bench/onnx_accuracy.py), so its bound only catches a broken graph, not the level's own cost.
KL_TOLERANCE = {0: 1e-6, 1: 1e-6, 2: 1e-6, 3: 1e-6, 4: 1e-2}
# float16 graphs round every intermediate: their (rel_err, KL) floors are fp16 arithmetic's
# (stories260K int4: 2e-3 and 1e-5). bfloat16 models are exported computing in float32.
DTYPE_TOLERANCE = {torch.float16: (5e-3, 1e-3)}


@dataclass
class Agreement:
    """How closely the exported graph reproduced PyTorch on the validation runs."""

    max_abs_err: float
    rel_err: float
    kl: float | None = None        # mean KL(torch || onnx), nats; causal LMs only
    top1: float | None = None      # next-token agreement in [0, 1]; causal LMs only
    positions: int = 0             # query positions the KL and top-1 are taken over


def sample_batches(vocab_size: int, max_positions: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validation inputs: (input_ids, attention_mask) int64 pairs of shapes (1, 1) and (3, 19), the
    second right-padded in two rows: sizes 1 (which tracing specialises) and >1 on both dynamic axes,
    and the mask."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b, t in ((1, 1), (3, min(19, max_positions - 1))):
        ids = torch.randint(0, vocab_size, (b, t), generator=gen)
        mask = torch.ones_like(ids)
        if b > 1:
            mask[1, t * 2 // 3:] = 0
            mask[2, t - 2:] = 0
        batches.append((ids, mask))
    return batches


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a decoder config."""
    heads = config.num_attention_heads
    return (config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def empty_past(config, batch: int, length: int = 0, dtype: torch.dtype = torch.float32,
               gen: torch.Generator | None = None) -> list[torch.Tensor]:
    """[key, value] * layers, each (batch, H_kv, length, D_h) in ``dtype`` (the model's: attention
    refuses a cache whose dtype differs from its query's)."""
    layers, heads, size = kv_shape(config)
    return [torch.randn(batch, heads, length, size, generator=gen).to(dtype) for _ in range(2 * layers)]


def reference_runs(wrapper, config, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> list[tuple[tuple, tuple[torch.Tensor, ...]]]:
    """(inputs, PyTorch outputs) of each validation run: ``sample_batches`` as prompts (P = 0) and,
    with past key/values, one decode step on top of the last prompt with its PyTorch cache as past.
    ``dtype``: the model's floating dtype, that of the caches fed in."""
    runs = []
    with torch.no_grad():
        for ids, mask in sample_batches(config.vocab_size, getattr(config, "max_position_embeddings", 512), seed):
            args = (ids, mask, empty_past(config, ids.shape[0], dtype=dtype)) if wrapper.past else (ids, mask)
            runs.append((args, wrapper(*args)))
        if wrapper.past:
            (ids, mask, _), outputs = runs[-1]
            step = torch.randint(0, config.vocab_size, (ids.shape[0], 1), generator=torch.Generator().manual_seed(seed))
            args = (step, torch.cat((mask, torch.ones_like(step)), dim=1), list(outputs[1:]))
            runs.append((args, wrapper(*args)))
    return runs


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as onnxruntime takes it; bfloat16 (which numpy lacks) as ml_dtypes' bfloat16."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """Inverse of ``to_numpy`` (bfloat16 arrays come back as torch.bfloat16)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def feeds(names: list[str], args: tuple) -> dict[str, np.ndarray]:
    """onnxruntime inputs by name from a run's (input_ids, attention_mask[, past]) arguments."""
    flat = [args[0], args[1], *(args[2] if len(args) > 2 else ())]
    return {n: to_numpy(t) for n, t in zip(names, flat)}


def logit_agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(mean KL(softmax(ref) || softmax(got)) in nats, top-1 agreement) over rows of (P, V) logits."""
    ref, got = ref.double(), got.double()
    logp, logq = F.log_softmax(ref, dim=-1), F.log_softmax(got, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0)
    return float(kl.mean()), float((ref.argmax(-1) == got.argmax(-1)).double().mean())


def compare(got: list[list], runs: list[tuple[tuple, tuple[torch.Tensor, ...]]],
            logits: bool = False) -> Agreement:
    """The Agreement of onnxruntime outputs ``got`` (one list of arrays per run) with ``runs``.

    The first output (logits / hidden states) counts only where the query position is not padding.
    ``logits``: the first output is next-token logits (B, T, V), so KL and top-1 are measured too.
    """
    diff, scale = 0.0, 0.0
    ref_rows, got_rows = [], []
    for outs, ((ids, mask, *_), expected) in zip(got, runs):
        keep = mask[:, -ids.shape[1]:].bool()
        for i, (o, r) in enumerate(zip(outs, expected)):
            o, r = from_numpy(o).double(), r.double()
            if i == 0:
                o, r = o[keep], r[keep]
                if logits:
                    ref_rows.append(r)
                    got_rows.append(o)
            diff = max(diff, float((o - r).abs().max()))
            scale = max(scale, float(r.abs().max()))
    result = Agreement(diff, diff / scale if scale else diff)
    if logits and ref_rows:
        ref_all, got_all = torch.cat(ref_rows), torch.cat(got_rows)
        result.kl, result.top1 = logit_agreement(ref_all, got_all)
        result.positions = ref_all.shape[0]
    return result
