"""Calibration batches and the metric analyzers measure, with re-runs that start at a block.

The metric: causal LMs, the mean next-token NLL over every predicted position of the windows
("nll"), or the mean KL(p_ref ‖ p) of next-token distributions over every position ("kl");
encoders, 1 − mean cosine between each text's mean-pooled embedding and the unmodified model's.
References (embeddings, logits) come from one reference pass. A "kl" reference keeps the
unmodified logits as the model gives them (float32: half the bytes of the float64 log-probabilities
they turn into, bit-identical when recomputed) and takes log_softmax in float64 when it compares.

Perturbation methods (oracle, pmpq, tdmpq) change one unit at a time and re-measure. A change in
block i cannot affect blocks 0..i-1, so the reference pass records the hidden states entering
every block and a re-run from block i replaces blocks 0..i-1 by pass-throughs and feeds block i
its recorded input: about half the work of a full forward on average. The recorded states cost
n_blocks x samples x seq_len x hidden floats (kept on the CPU); the reference pass checks once
that a re-run reproduces the reference metric and falls back to full forwards when it does not.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import encoder_batches, sample_texts, token_stream_batches
from ..errors import CompressError
from ..models import LoadedModel, cap_to_context
from .base import AnalyzerConfig, BlockList, patched

METRICS = {"causal-lm": {"nll": "mean_nll", "kl": "mean_kl"}, "encoder": "one_minus_cosine"}


class _Skip(nn.Module):
    """Stands in for a block before the re-run's first block: passes its hidden input on, unchanged."""

    def __init__(self, tuple_len: int | None) -> None:
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if self.tuple_len is None else (hidden,) + (None,) * (self.tuple_len - 1)


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class Calibration:
    """Batches of one model's calibration data and its metric (see the module docstring).

    data: texts, or for a causal LM an int64 tensor (n, T) of token windows used as they are.
    Encoder texts are sorted by length before batching so batches carry little padding.
    """

    def __init__(self, loaded: LoadedModel, data: list[str] | torch.Tensor, config: AnalyzerConfig,
                 blocks: BlockList | None, device: torch.device | None = None) -> None:
        if loaded.kind not in METRICS:
            raise CompressError(f"sensitivity analysis of {loaded.kind} models is not supported yet "
                                f"(supported: {', '.join(METRICS)})")
        self.kind = loaded.kind
        self.metric_name = METRICS["causal-lm"][config.causal_metric] if self.kind == "causal-lm" \
            else METRICS["encoder"]
        self.blocks = blocks
        self.progress = config.progress
        # The model's device, or the one a streamed analysis runs its blocks on (its model is on meta).
        self.device = device if device is not None else next(loaded.model.parameters()).device
        # Windows (causal LM) or truncation (encoder) never longer than the model's context.
        self._model_config = getattr(loaded.model, "config", None)
        if isinstance(data, torch.Tensor):
            self.batches = self._window_batches(data, config)
            self.seq_len = self.batches[0]["input_ids"].shape[1]
        else:
            self.seq_len = cap_to_context(config.seq_len, self._model_config, f"{config.method} calibration windows")
            if len(data) == 0:
                raise CompressError("no calibration texts were given")
            if loaded.tokenizer is None:
                raise CompressError(f"{loaded.path} has no tokenizer: give token windows instead of texts")
            if self.kind == "causal-lm":
                ids = token_stream_batches(loaded.tokenizer, sample_texts(data, len(data), config.seed),
                                           self.seq_len, config.samples)
                self.batches = self._window_batches(ids, config)
            else:
                texts = sample_texts(data, config.samples, config.seed)
                lengths = [len(x) for x in loaded.tokenizer(texts, truncation=True,
                                                            max_length=self.seq_len)["input_ids"]]
                texts = [t for _, t in sorted(zip(lengths, texts), key=lambda p: p[0])]
                self.batches = list(encoder_batches(loaded.tokenizer, texts, self.seq_len, config.batch_size))
        self.n_samples = sum(b["input_ids"].shape[0] for b in self.batches)
        if self.n_samples < config.min_samples:
            raise CompressError(f"{config.method} needs at least {config.min_samples} calibration samples; "
                                f"the data gave {self.n_samples}")
        if not isinstance(data, torch.Tensor) and self.n_samples < config.samples:
            what = (f"windows of {self.seq_len} tokens" if self.kind == "causal-lm" else "texts")
            raise CompressError(f"calibration data too small: {config.samples} samples asked, the texts give "
                                f"{self.n_samples} {what}; give more text or fewer samples")
        self.base: float | None = None  # the unmodified model's metric, set by the reference pass
        # Per batch: encoder embeddings (B, C), or the causal LM's logits (B, T, V) for "kl".
        self._ref: list[torch.Tensor] | None = None
        self._inputs: list[list[torch.Tensor]] | None = None  # [block][batch] (B, T, C), CPU
        self._tuple_len: int | None = None
        self._current = 0

    def _window_batches(self, ids: torch.Tensor, config: AnalyzerConfig) -> list[dict[str, torch.Tensor]]:
        if self.kind != "causal-lm":
            raise CompressError("token windows are calibration data for causal LMs only; give an encoder texts")
        if ids.dtype != torch.long or ids.dim() != 2 or ids.shape[1] < 2:
            raise CompressError(f"token windows must be int64 (n, T) with T >= 2, got {ids.dtype} "
                                f"{tuple(ids.shape)}")
        ids = ids[: config.samples]
        # Windows are used as they are, but never past the model's context.
        ids = ids[:, : cap_to_context(ids.shape[1], self._model_config, "calibration token windows")]
        return [{"input_ids": ids[i : i + config.batch_size]} for i in range(0, ids.shape[0], config.batch_size)]

    # ---- batches -------------------------------------------------------------------------------

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        """Batch b on the model's device."""
        return {k: v.to(self.device) for k, v in self.batches[b].items()}

    def mask(self, b: int) -> torch.Tensor:
        """Float (B, T) mask of real tokens (all ones for causal-LM windows), on the device."""
        batch = self.batches[b]
        m = batch.get("attention_mask")
        return (torch.ones_like(batch["input_ids"]) if m is None else m).to(self.device, torch.float32)

    def pool(self, hidden: torch.Tensor, b: int) -> torch.Tensor:
        """Mean over real tokens: hidden (B, T, C) -> float32 (B, C)."""
        m = self.mask(b).unsqueeze(-1)  # (B, T, 1)
        return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, model: nn.Module, b: int) -> torch.Tensor:
        """Logits (B, T, V) of a causal LM or last hidden states (B, T, C) of an encoder, batch b."""
        if self.kind == "causal-lm":
            return model(**self.batch(b), use_cache=False).logits
        return model(**self.batch(b)).last_hidden_state

    def positions(self, out: torch.Tensor) -> torch.Tensor:
        """A causal LM's logits (B, T, V) at the positions the metric averages over."""
        return out[:, :-1] if self.metric_name == "mean_nll" else out

    def tokens(self, b: int) -> int:
        """Positions batch b contributes to the metric (predicted tokens, all positions, or texts)."""
        ids = self.batches[b]["input_ids"]
        if self.kind == "encoder":
            return ids.shape[0]
        return ids.numel() - ids.shape[0] if self.metric_name == "mean_nll" else ids.numel()

    # ---- the metric ----------------------------------------------------------------------------

    def _batch_metric(self, out: torch.Tensor, b: int) -> float:
        """Sum over batch b of the per-position metric (NLL per token, or 1 − cosine per text)."""
        # Sums, cosines and KL log-probabilities in float64: the damage of an int8 layer can be below
        # float32's resolution of a metric near 10 (an NLL), of a cosine near 1, or of a KL near 0.
        if self.metric_name == "mean_nll":
            ids = self.batches[b]["input_ids"].to(self.device)
            logp = F.log_softmax(out[:, :-1].float(), dim=-1)  # (B, T-1, V)
            return -logp.gather(-1, ids[:, 1:, None]).double().sum().item()
        if self.metric_name == "mean_kl":
            # A few positions at a time: a whole batch's float64 temporaries are several times its
            # logits (6.4 GiB added for 8 x 128 tokens of a 128k vocabulary, bench/metric.py
            # --memory); a chunk's are a few x 32 MB whatever the vocabulary.
            vocab = out.shape[-1]
            out2, ref2 = out.reshape(-1, vocab), self._ref[b].reshape(-1, vocab)  # (B*T, V)
            step, total = max(1, (1 << 22) // vocab), 0.0
            for i in range(0, out2.shape[0], step):
                logp = F.log_softmax(out2[i:i + step].double(), dim=-1)
                ref = F.log_softmax(ref2[i:i + step].to(self.device).double(), dim=-1)
                total += (ref.exp() * (ref - logp)).sum().item()
            return total
        emb = self.pool(out, b).double()
        return (1 - F.cosine_similarity(emb, self._ref[b].to(self.device, torch.float64), dim=-1)).sum().item()

    @torch.no_grad()
    def reference(self, model: nn.Module) -> float:
        """Reference pass over the unmodified model: metric, encoder embeddings, block inputs."""
        if self.base is not None:
            return self.base
        inputs: list[list[torch.Tensor]] = [[] for _ in self.blocks.modules] if self.blocks else []
        hooks = []
        if self.blocks is not None:
            for i, block in enumerate(self.blocks.modules):
                if i > 0:  # a re-run from block 0 is a full forward: its input is never replayed
                    hooks.append(block.register_forward_pre_hook(
                        lambda m, a, k, i=i: inputs[i].append(_hidden_arg(a, k).detach().to("cpu", copy=True)),
                        with_kwargs=True))
            hooks.append(self.blocks.modules[0].register_forward_hook(self._record_output_type))
        total, self._ref = 0.0, []
        try:
            for b in tqdm(range(len(self.batches)), desc="reference pass", disable=not self.progress,
                          leave=False):
                out = self.forward(model, b)
                if self.kind == "encoder":
                    self._ref.append(self.pool(out, b).cpu())
                elif self.metric_name == "mean_kl":
                    self._ref.append(out.detach().to("cpu", copy=True))
                total += self._batch_metric(out, b)
        finally:
            for h in hooks:
                h.remove()
        self.base = total / sum(self.tokens(b) for b in range(len(self.batches)))
        if self.blocks is not None and len(self.blocks.modules) > 1:
            self._inputs = inputs
            last = len(self.blocks.modules) - 1
            replayed = self.metric(model, last)
            if not math.isclose(replayed, self.base, rel_tol=1e-5, abs_tol=1e-7):
                warnings.warn(f"re-running {type(model).__name__} from block {last} gives metric {replayed:.6g}, "
                              f"not {self.base:.6g}: using full forwards (slower)")
                self._inputs = None
        return self.base

    def _record_output_type(self, module, args, output) -> None:
        self._tuple_len = len(output) if isinstance(output, tuple) else None

    @contextmanager
    def _replaying(self, start: int) -> Iterator[None]:
        """Blocks before ``start`` become pass-throughs; block ``start`` gets its recorded input."""
        if start == 0 or self._inputs is None:
            yield
            return
        modules = self.blocks.modules
        saved = [modules[i] for i in range(start)]

        def feed(module, args, kwargs):
            recorded = self._inputs[start][self._current].to(self.device)
            if args:
                return (recorded,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": recorded}

        hook = modules[start].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            for i in range(start):
                modules[i] = _Skip(self._tuple_len)
            yield
        finally:
            hook.remove()
            for i, m in enumerate(saved):
                modules[i] = m

    @torch.no_grad()
    def metric(self, model: nn.Module, start: int = 0) -> float:
        """The metric of the model as it is now, knowing blocks before ``start`` are unchanged."""
        if self.base is None:
            self.reference(model)
        total = 0.0
        with self._replaying(start):
            for b in range(len(self.batches)):
                self._current = b
                total += self._batch_metric(self.forward(model, b), b)
        return total / sum(self.tokens(b) for b in range(len(self.batches)))

    def trial(self, model: nn.Module, linears: list[nn.Linear], weights: list[torch.Tensor], start: int) -> float:
        """Metric change when ``linears`` hold ``weights`` (then restored); blocks < start untouched."""
        base = self.reference(model)
        with patched(linears, weights):
            return self.metric(model, start) - base
