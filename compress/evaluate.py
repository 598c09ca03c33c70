"""Quality and size of a compressed model against its uncompressed original.

Causal LMs: perplexity on a text and the mean KL divergence KL(p_ref ‖ p_compressed) of next-token
distributions. Encoders: mean cosine similarity of mean-pooled embeddings, and neighbour overlap
(the share of each text's 10 nearest neighbours, by cosine among the evaluation texts, that stay
the same; top-1 retrieval agreement saturates even at 3 bits and tells nothing apart). Always:
weight bytes, average bits of the quantized layers, compression ratios vs fp16 and fp32.
"""
from __future__ import annotations

import fnmatch

import inspect
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import encoder_batches, token_stream_batches
from .errors import CompressError
from .models import cap_to_context
from .qlinear import QuantLinear


@torch.no_grad()
def pooled_embeddings(model: nn.Module, tokenizer, texts: list[str], max_length: int = 128,
                      batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Mean-pooled last hidden states over non-padding tokens: float32 (len(texts), hidden)."""
    out = []
    for batch in tqdm(list(encoder_batches(tokenizer, texts, max_length, batch_size)),
                      desc="embedding", disable=not progress, leave=False):
        hidden = model(**batch).last_hidden_state.float()  # (B, T, C)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out)


def embedding_fidelity(ref: torch.Tensor, emb: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Mean cosine of paired rows and the mean overlap of each row's k nearest neighbours.

    ref, emb: float (n, d) embeddings of the same n texts by the reference and compressed model.
    """
    if ref.shape != emb.shape:
        raise CompressError(f"embedding shapes differ: {tuple(ref.shape)} vs {tuple(emb.shape)}")
    cos = F.cosine_similarity(ref, emb, dim=-1)
    k = min(k, ref.shape[0] - 1)
    overlap = float("nan")
    if k >= 1:
        def knn(e):
            e = F.normalize(e, dim=-1)
            sim = e @ e.T
            sim.fill_diagonal_(-float("inf"))
            return sim.topk(k, dim=-1).indices  # (n, k)

        a, b = knn(ref), knn(emb)
        same = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float()  # (n, k)
        overlap = same.mean().item()
    return {"mean_cosine": cos.mean().item(), "one_minus_cosine": (1 - cos).mean().item(),
            f"neighbour_overlap@{k}": overlap}


@torch.no_grad()
def causal_logits(model: nn.Module, ids: torch.Tensor, batch_size: int = 8):
    """Yield float32 logits (b, T, V) for batches of token windows ids (n, T)."""
    for i in range(0, ids.shape[0], batch_size):
        yield model(input_ids=ids[i : i + batch_size]).logits.float()


LOGITS_BUDGET = 1 << 24  # float32 values of logits held per evaluation batch (64 MB)


@torch.no_grad()
def lm_metrics(model: nn.Module, ids: torch.Tensor, reference: nn.Module | None = None,
               batch_size: int | None = None, progress: bool = False) -> dict[str, float]:
    """Perplexity of ``model`` on windows ids (n, T) int64 and, with ``reference``, mean KL and the
    reference's own perplexity (from the same forward passes).

    KL(p_ref ‖ p_model) is averaged over every predicted position (all T of each window). The
    metrics stream: only one batch of windows' logits is held at a time, and batch_size (default)
    is chosen so that a batch's logits hold at most LOGITS_BUDGET values (one 256-token window of a
    50k vocabulary is 13 M), so memory does not grow with the text or the vocabulary's batch.
    """
    if batch_size is None:
        per_window = ids.shape[1] * model.config.vocab_size if hasattr(model, "config") else 1
        batch_size = max(1, min(64, LOGITS_BUDGET // max(per_window, 1)))
    nll_sum, n_tok, kl_sum, n_pos, ref_nll_sum = 0.0, 0, 0.0, 0, 0.0
    ref_iter = causal_logits(reference, ids, batch_size) if reference is not None else None
    batches = causal_logits(model, ids, batch_size)
    total = math.ceil(ids.shape[0] / batch_size)
    for i, logits in enumerate(tqdm(batches, total=total, desc="evaluating", disable=not progress, leave=False)):
        chunk = ids[i * batch_size : (i + 1) * batch_size]
        logp = F.log_softmax(logits, dim=-1)  # (b, T, V)
        nll = -logp[:, :-1].gather(-1, chunk[:, 1:, None]).squeeze(-1)
        nll_sum += nll.sum().item()
        n_tok += nll.numel()
        if ref_iter is not None:
            ref_logp = F.log_softmax(next(ref_iter), dim=-1)
            ref_nll_sum -= ref_logp[:, :-1].gather(-1, chunk[:, 1:, None]).sum().item()
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (b, T)
            kl_sum += kl.sum().item()
            n_pos += kl.numel()
            del ref_logp
        del logp, logits
    out = {"perplexity": math.exp(nll_sum / n_tok), "mean_nll": nll_sum / n_tok, "tokens": n_tok}
    if reference is not None:
        out["mean_kl"] = kl_sum / n_pos
        out["reference_perplexity"] = math.exp(ref_nll_sum / n_tok)
    return out


@torch.no_grad()
def sample_sequences(model: nn.Module, n: int, length: int, bos_id: int = 1, seed: int = 0,
                     batch_size: int = 16) -> torch.Tensor:
    """n sequences of ``length`` tokens sampled at temperature 1 from BOS: int64 (n, length)."""
    gen = torch.Generator().manual_seed(seed)
    # transformers 5.2x renamed past_key_values to cache (in and out); accept either.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.full((b, 1), bos_id, dtype=torch.long)
        past = None
        step_in = ids
        for _ in range(length - 1):
            out = model(input_ids=step_in, use_cache=True, **{cache_kw: past})
            past = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            probs = F.softmax(out.logits[:, -1].float(), dim=-1)
            step_in = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, step_in], dim=1)
        rows.append(ids)
    return torch.cat(rows)


@dataclass
class SizeReport:
    """Bytes and bits of a model's weights as held: packed codes, scales and zero points of
    quantized parts, every other tensor in its dtype; tied tensors counted once.

    by_kind: bytes of linear layers ("linears"), embedding tables ("embeddings"), output heads
    ("heads": lm_head, classifiers; a head tied to its table costs nothing of its own) and
    everything else ("rest": norms, biases, ...). params: original weights (a quantized layer's
    N·K), tied once; ratio_vs_fp16 compares with those params in 16 bits.
    """

    total_bytes: int
    quantized_layers: int
    quantized_params: int
    quantized_bytes: int
    params: int
    by_kind: dict = field(default_factory=dict)

    @property
    def avg_bits_quantized(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else float("nan")

    @property
    def ratio_vs_fp16(self) -> float:
        return 2 * self.params / self.total_bytes

    @property
    def ratio_vs_fp32(self) -> float:
        return 4 * self.params / self.total_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "avg_bits_quantized": self.avg_bits_quantized,
                "ratio_vs_fp16": self.ratio_vs_fp16, "ratio_vs_fp32": self.ratio_vs_fp32}


def _kind_of(name: str, module: nn.Module) -> str:
    from .models import HEAD_PATTERNS
    from .qlinear import QuantEmbedding

    if isinstance(module, (nn.Embedding, QuantEmbedding)):
        return "embeddings"
    if any(fnmatch.fnmatch(name, p) for p in HEAD_PATTERNS):
        return "heads"
    return "linears"


def size_report(model: nn.Module) -> SizeReport:
    """Count the model's bytes as held (see SizeReport); ``params`` counts original weights."""
    from .models import is_linear
    from .qlinear import QuantEmbedding

    by_kind = {"linears": 0, "embeddings": 0, "heads": 0, "rest": 0}
    seen: set = set()
    params = q_layers = q_params = q_bytes = 0

    def count(t: torch.Tensor, kind: str, weights: int | None = None) -> None:
        nonlocal params
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" \
            else id(t)
        if key in seen:
            return
        seen.add(key)
        by_kind[kind] += t.numel() * t.element_size()
        params += t.numel() if weights is None else weights

    for name, m in model.named_modules():
        kind = _kind_of(name, m)
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            n, k = (m.out_features, m.in_features) if isinstance(m, QuantLinear) else (m.num_embeddings,
                                                                                         m.embedding_dim)
            packed = [m.qweight, m.scales] + ([m.zeros] if getattr(m, "zeros", None) is not None else [])
            if m.qweight.device.type == "meta" or (m.qweight.untyped_storage().data_ptr(),
                                                   m.qweight.storage_offset(), tuple(m.qweight.shape)) not in seen:
                q_layers += 1
                q_params += n * k
                q_bytes += m.weight_bytes()
            for i, t in enumerate(packed):
                count(t, kind, n * k if i == 0 else 0)
            if getattr(m, "bias", None) is not None:
                count(m.bias, "rest")
        elif is_linear(m) or isinstance(m, nn.Embedding):
            count(m.weight, kind)
            if getattr(m, "bias", None) is not None:
                count(m.bias, "rest")
    for p in model.parameters():
        count(p, "rest")
    return SizeReport(sum(by_kind.values()), q_layers, q_params, q_bytes, params, by_kind)


def stored_checkpoint_bytes(path) -> int | None:
    """Tensor bytes of a model directory's safetensors files as stored (None without any)."""
    from pathlib import Path

    from .safetensors_io import read_header

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        _, header = read_header(f)
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    return total


def evaluate_models(model: nn.Module, reference: nn.Module, kind: str, tokenizer, texts: list[str],
                    seq_len: int = 256, n_sequences: int = 32, max_length: int = 128,
                    progress: bool = True) -> dict[str, float]:
    """The quality metrics of ``model`` against ``reference`` on ``texts`` for a model kind.

    causal-lm: perplexity of both and mean KL on ``n_sequences`` windows of ``seq_len`` tokens.
    encoder: embedding fidelity of mean-pooled embeddings (texts truncated to ``max_length``).
    Both lengths are cut to the reference's context length (with a warning) when longer.
    """
    if tokenizer is None:
        raise CompressError(f"evaluating a {kind} model needs its tokenizer, and none was saved with it")
    config = getattr(reference, "config", None)
    if kind == "causal-lm":
        seq_len = cap_to_context(seq_len, config, "evaluation windows")
        ids = token_stream_batches(tokenizer, texts, seq_len, n_sequences)
        return lm_metrics(model, ids, reference, progress=progress)
    if kind == "encoder":
        max_length = cap_to_context(max_length, config, "evaluation max_length")
        ref = pooled_embeddings(reference, tokenizer, texts, max_length, progress=progress)
        emb = pooled_embeddings(model, tokenizer, texts, max_length, progress=progress)
        return {**embedding_fidelity(ref, emb), "texts": len(texts)}
    raise CompressError(f"no text metric for a {kind} model; vision quality is measured in bench/hired.py")


def format_table(rows: list[tuple[str, object]], title: str = "") -> str:
    """A two-column terminal table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {fmt(v)}" for k, v in rows]
    return "\n".join(lines)
