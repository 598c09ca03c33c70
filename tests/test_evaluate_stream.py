"""Evaluation streams window by window: the same figures at any batch size, and batches sized so a
batch's logits stay under a fixed budget whatever the vocabulary."""
import pytest
import torch

import importlib

ev = importlib.import_module("compress.evaluate")  # the package binds compress.evaluate to api.evaluate
from compress.models import load_model


def test_metrics_equal_at_any_batch_and_batches_bounded(tiny_llama_dir, monkeypatch):
    lm = load_model(tiny_llama_dir)
    ids = torch.randint(0, 1000, (6, 16))
    ref = load_model(tiny_llama_dir).model
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    one = ev.lm_metrics(lm.model, ids, ref, batch_size=1)
    four = ev.lm_metrics(lm.model, ids, ref, batch_size=4)
    for key in one:
        assert four[key] == pytest.approx(one[key], rel=1e-5)
    seen = []
    real = ev.causal_logits

    def spy(model, chunk, batch_size=8):
        seen.append(batch_size)
        return real(model, chunk, batch_size)

    monkeypatch.setattr(ev, "causal_logits", spy)
    # a budget of two windows' logits: the default batch is 2
    monkeypatch.setattr(ev, "LOGITS_BUDGET", 2 * 16 * lm.model.config.vocab_size)
    auto = ev.lm_metrics(lm.model, ids, ref)
    assert set(seen) == {2} and auto["mean_kl"] == pytest.approx(one["mean_kl"], rel=1e-5)
