"""Quality of round-to-nearest on the real models (MiniLM always; stories260K with ../shared).

Cross-checks against independent measurements made on this machine (issue 2): MiniLM 1 - cosine
≈ 0.0005 at int8 and ≈ 0.030 at int4 g32 asymmetric (512 WikiText-2 lines); the bands below are
wide enough for the smaller sample used here and narrow enough to catch a wrong scale or layout.
bench/quality.py measures the full anchors.
"""
import pytest
import torch

from compress.apply import apply_plan
from compress.data import default_corpus, load_texts
from compress.evaluate import embedding_fidelity, pooled_embeddings
from compress.models import load_model, quantizable_linears
from compress.planner import uniform_plan


@pytest.fixture(scope="module")
def minilm_setup(minilm_dir):
    from compress.data import shared_data_dir

    d = shared_data_dir()
    texts = load_texts(d / "text" / "wikitext2-test.txt", limit=128) if d else default_corpus()[:128]
    ref = load_model(minilm_dir)
    ref_emb = pooled_embeddings(ref.model, ref.tokenizer, texts)
    return minilm_dir, texts, ref_emb


@pytest.mark.parametrize("bits,group,lo,hi", [(8, -1, 0.0, 0.001), (4, 32, 0.01, 0.06)])
def test_minilm_rtn(minilm_setup, bits, group, lo, hi):
    path, texts, ref_emb = minilm_setup
    lm = load_model(path)
    apply_plan(lm.model, uniform_plan(quantizable_linears(lm.model), bits, group), progress=False)
    fid = embedding_fidelity(ref_emb, pooled_embeddings(lm.model, lm.tokenizer, texts))
    print(f"MiniLM int{bits} g{group}: {fid}")
    assert lo <= fid["one_minus_cosine"] <= hi
    if bits == 8:
        assert fid["mean_cosine"] >= 0.999


@pytest.fixture(scope="module")
def stories(shared_data):
    from compress.evaluate import sample_sequences
    from compress.llama2c import stories260k_dir

    path = stories260k_dir()
    ref = load_model(path)
    torch.manual_seed(0)
    ids = sample_sequences(ref.model, 16, 128, seed=0)
    return path, ref, ids


@pytest.mark.parametrize("bits,group,kl_hi", [(8, -1, 0.002), (4, 32, 0.2)])
def test_stories260k_rtn(stories, bits, group, kl_hi):
    from compress.evaluate import lm_metrics

    path, ref, ids = stories
    lm = load_model(path)
    plan = uniform_plan(quantizable_linears(lm.model), bits, group)
    apply_plan(lm.model, plan, progress=False)
    m = lm_metrics(lm.model, ids, ref.model)
    ref_ppl = lm_metrics(ref.model, ids)["perplexity"]
    print(f"stories260K int{bits} g{group}: ppl {m['perplexity']:.4f} (fp32 {ref_ppl:.4f}), KL {m['mean_kl']:.5f}")
    assert m["mean_kl"] < kl_hi
    if bits == 8:
        assert abs(m["perplexity"] / ref_ppl - 1) < 0.01
    else:
        assert m["mean_kl"] > 0.02  # int4 must cost something; zero would mean nothing was quantized
    # Greedy generation stays fluent: the first words of the known continuation survive.
    prompt = lm.tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    gen = lm.model.generate(prompt, max_new_tokens=12, do_sample=False)
    text = lm.tokenizer.decode(gen[0], skip_special_tokens=True)
    print(text)
    assert text.startswith("Once upon a time, there was a little")


def test_reference_perplexity_from_the_same_pass(tiny_llama_dir):
    from compress.evaluate import lm_metrics

    ref = load_model(tiny_llama_dir)
    ids = torch.randint(0, 1000, (3, 16))
    both = lm_metrics(ref.model, ids, ref.model)
    assert both["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert both["reference_perplexity"] == pytest.approx(lm_metrics(ref.model, ids)["perplexity"], rel=1e-6)
