"""GGUF export: block re-packing against gguf's own dequantizer, whole tiny Llama / Qwen2 models read
back with gguf's reader (names, types, metadata, vocabulary) and run by a numpy transcription of
llama.cpp's graph, stories260K, the CLI, and bad input."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import compress
from compress.errors import CompressError
from compress.export import gguf_blocks as gb
from compress.export import gguf_compatible, gguf_type
from compress.export.gguf_export import export_gguf
from compress.export.gguf_vocab import PRE_TOKENIZERS
from compress.models import load_model
from compress.plan import LayerPlan
from compress.quant import QuantSpec, dequantize, quantize
from compress.servable import GGUF_BLOCK_BYTES, layer_bytes

gguf = pytest.importorskip("gguf", reason="needs gguf: pip install gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402


def _weight(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.05, 2.0, n)[:, None]
    w[0, :40] = 0.0  # an all-zero group: scale stored as 1.0, codes at the zero point
    w[1] = w[1].abs()  # a row with no negative weight (asymmetric zero point 0)
    return w


# (spec, K, GGUF type): exact groups, groups longer than a block (re-blocked), padded groups (K = 96
# at g64 / g128), one group per row.
BLOCK_CASES = [(QuantSpec(4, 32, True), 96, "Q4_0"), (QuantSpec(4, 32, False), 64, "Q4_1"),
               (QuantSpec(8), 160, "Q8_0"), (QuantSpec(4, 64, True), 96, "Q4_0"),
               (QuantSpec(4, 128, False), 96, "Q4_1"), (QuantSpec(4, -1, True), 64, "Q4_0"),
               (QuantSpec(4, -1, False), 128, "Q4_1")]


@pytest.mark.parametrize("spec,k,kind", BLOCK_CASES)
def test_blocks_dequantize_in_gguf_to_compress_weights(spec, k, kind):
    qw = quantize(_weight(24, k, seed=k), spec)
    got_kind, arr, fell_back = gb.encode_weight(qw, None, allow_f16=False)
    assert (got_kind, fell_back) == (kind, False) and gguf_type(spec, k) == kind
    assert arr.dtype == np.uint8 and arr.shape == (24, k // 32 * GGUF_BLOCK_BYTES[kind])
    assert arr.nbytes == layer_bytes(spec, 24, k, "gguf")
    got = torch.from_numpy(gguf_dequantize(arr, T[kind]))
    want = dequantize(qw)
    if kind == "Q4_1":  # m = -d*z rounded to fp16 once
        m = np.ascontiguousarray(arr.reshape(-1, 20)[:, 2:4]).view(np.float16).astype(np.float32)
        assert float((got - want).abs().max()) <= 2.0 ** -11 * np.abs(m).max() + 1e-7
        assert not torch.equal(got, want)  # the rounding is real: a zero bound would not test it
    else:
        assert torch.equal(got, want)


def test_q4_nibble_order_is_ggml_and_codes_are_repacked_not_requantized():
    # One row of one block whose codes are 0..15 then 15..0, at scale 1: element j + 16 must come
    # from the high nibble of byte j.
    codes = torch.cat((torch.arange(16), torch.arange(15, -1, -1))).to(torch.uint8)[None]
    qw = compress.quant.QuantizedWeight(QuantSpec(4, 32, True), 32, compress.quant.pack_int4(codes),
                                        torch.ones(1, 1, dtype=torch.float16))
    kind, arr = gb.q4_blocks(qw)
    assert kind == "Q4_0" and arr.shape == (1, 18)
    assert arr[0, :2].view(np.float16)[0] == 1.0
    qs = arr[0, 2:]
    assert [int(b & 15) for b in qs] == list(range(16)) and [int(b >> 4) for b in qs] == list(range(15, -1, -1))


def test_int8_blocks_repeat_the_row_scale():
    qw = quantize(_weight(3, 64, seed=1), QuantSpec(8))
    arr = gb.q8_blocks(qw).reshape(3, 2, 34)
    assert np.array_equal(arr[:, 0, :2], arr[:, 1, :2])
    assert np.array_equal(arr[:, :, :2].reshape(3, 2, 2)[:, 0].copy().view(np.float16).reshape(3),
                          qw.scales.numpy().reshape(3))
    assert np.array_equal(arr[:, :, 2:].reshape(3, 64).view(np.int8), qw.qweight.numpy())


@pytest.mark.parametrize("spec,k,ok", [
    (QuantSpec(4, 32, True), 64, True), (QuantSpec(4, 32, False), 4096, True), (QuantSpec(8), 96, True),
    (QuantSpec(16), 172, True), (QuantSpec(4, 32, True), 172, False), (QuantSpec(8), 172, False),
    (QuantSpec(4, -1, True), 48, False), (QuantSpec(4, 128, True), 160, True), (QuantSpec(4, -1, True), 13, False)])
def test_gguf_compatible(spec, k, ok):
    assert gguf_compatible(spec, k) is ok
    if not ok:
        with pytest.raises(CompressError, match="no GGUF type holds"):
            layer_bytes(spec, 8, k, "gguf")


def test_rope_permutation_inverts_the_halves_order():
    from compress.llama2c import _interleaved_to_halves

    w = torch.randn(4 * 16, 8)
    hf = _interleaved_to_halves(w, 4)  # llama2.c (interleaved) -> Hugging Face (halves)
    assert torch.equal(hf[gb.rope_interleave_perm(64, 4)], w)
    qw = quantize(hf, QuantSpec(4, -1, False))
    moved = gb.permute_rows(qw, gb.rope_interleave_perm(64, 4))
    assert torch.equal(dequantize(moved), dequantize(qw)[gb.rope_interleave_perm(64, 4)])


def test_f16_becomes_bf16_only_where_fp16_overflows():
    assert gb.plain_tensor(torch.tensor([[1.0, -2.5]]))[0] == "F16"
    kind, arr = gb.plain_tensor(torch.tensor([[1.0, 7e4]]))
    assert kind == "BF16" and arr.shape == (1, 4)
    assert torch.equal(torch.from_numpy(gguf_dequantize(arr, T.BF16)), torch.tensor([[1.0, 70144.0]]))


# ---- tiny models ------------------------------------------------------------------------------

_CHARS = list(" abcdefghijklmnopqrstuvwxyz.,!?'TOS")
_MERGED = [" t", "he", " a", "in", " the", "an", "nd", " and", "ing", "on", " s", "er", " w", "ed", "it", "ou",
           " he", "is", " was"]


def _spm_tokenizer():
    """A llama2.c-style vocabulary (specials, 256 byte pieces, characters, scored merges) as the
    Hugging Face tokenizer compress.llama2c builds for stories260K."""
    from compress.llama2c import build_hf_tokenizer

    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + _CHARS + _MERGED
    scores = [0.0] * (259 + len(_CHARS)) + [-float(i) for i in range(len(_MERGED))]
    return build_hf_tokenizer(pieces, scores), len(pieces)


LLAMA3_REGEX = next(k for k, v in PRE_TOKENIZERS.items() if v == "llama-bpe")
QWEN2_REGEX = next(k for k, v in PRE_TOKENIZERS.items() if v == "qwen2")
TEXT = ["Once upon a time there was a little girl who liked to play in the sun.",
        "The dog and the cat went to the park, and it was fun!", "She is happy. He was sad?"] * 3


def _bpe_tokenizer(regex):
    """A byte-level BPE trained here (Llama 3 / Qwen2 style pre-tokenizer) with two special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>")
    return hf, len(hf)


def _save_tiny(path, arch, tokenizer, vocab, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    model = model_cls(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # transformers starts biases at 0 and norms at 1: a swapped or
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))  # dropped one would go unseen
            elif p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            p.copy_((p * 3 if p.dim() == 2 else p).half().float())  # fp16-representable: F16 is exact
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_spm(tmp_path_factory):
    """Llama, untied head, SentencePiece-style vocabulary of 313 tokens in a 319-row embedding."""
    tok, n = _spm_tokenizer()
    return _save_tiny(tmp_path_factory.mktemp("llama-spm"), "llama", tok, n + 6, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama_bpe(tmp_path_factory):
    """Llama, tied head, byte-level BPE (Llama 3 regex), llama3 RoPE scaling (the rope_freqs tensor)."""
    tok, n = _bpe_tokenizer(LLAMA3_REGEX)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return _save_tiny(tmp_path_factory.mktemp("llama-bpe"), "llama", tok, n, tie_word_embeddings=True,
                      rope_parameters=rope)


@pytest.fixture(scope="module")
def qwen2_bpe(tmp_path_factory):
    """Qwen2 (q/k/v biases, rotate-half RoPE kept), byte-level BPE with Qwen2's regex."""
    tok, n = _bpe_tokenizer(QWEN2_REGEX)
    # Rows to spare, as Qwen2 has: loading adds Qwen2Tokenizer's <|endoftext|> as token n.
    return _save_tiny(tmp_path_factory.mktemp("qwen2"), "qwen2", tok, n + 8, tie_word_embeddings=False)


# Every storage the exporter maps, cycled over the layers (q, k, v, o, gate, up, down, ...).
MIXED = [(4, 32, True), (4, 32, False), (8, -1, True), (16, -1, True), (4, 64, True), (4, -1, False)]
EXPECT = {(4, 32, True): "Q4_0", (4, 32, False): "Q4_1", (8, -1, True): "Q8_0", (16, -1, True): "F16",
          (4, 64, True): "Q4_0", (4, -1, False): "Q4_1"}


def _mixed(model_dir, tmp, include_heads=False):
    lm = load_model(model_dir)
    p = compress.plan(model_dir, bits=4, group_size=32, symmetric=True, loaded=lm, include_heads=include_heads)
    for i, name in enumerate(p.layers):
        p.layers[name] = LayerPlan(*MIXED[i % len(MIXED)])
    p.target = "any"  # mixed shards of one fused vLLM layer on purpose
    comp = compress.apply(model_dir, p, tmp / "comp", progress=False)
    return p, comp


# Relative logit error allowed where Q4_1 layers take part (measured 6e-4 on the tiny Llama).
Q41_LOGIT_TOL = 3e-3


def _fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def llama_cpp_reference(path, ids):
    """Logits (T, V) float64 of one sequence, computed from the GGUF file alone the way llama.cpp's
    llama / qwen2 graphs do: RMSNorm, RoPE on adjacent pairs ("llama") or halves ("qwen2") with
    rope_freqs dividing the frequencies, grouped-query causal attention, SwiGLU, tied output."""
    r = GGUFReader(path)
    f = _fields(r)
    arch = f["general.architecture"]
    n_layer, heads, kv = (f[f"{arch}.block_count"], f[f"{arch}.attention.head_count"],
                          f[f"{arch}.attention.head_count_kv"])
    eps, base, d = f[f"{arch}.attention.layer_norm_rms_epsilon"], f[f"{arch}.rope.freq_base"], f[f"{arch}.rope.dimension_count"]
    w = {t.name: gguf_dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    t_len = len(ids)
    freqs = base ** (-np.arange(0, d, 2) / d)
    if "rope_freqs.weight" in w:
        freqs = freqs / w["rope_freqs.weight"]
    ang = np.arange(t_len)[:, None] * freqs[None]  # (T, D/2)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(v):  # (T, heads, D)
        if arch == "llama":
            a, b = v[..., 0::2], v[..., 1::2]
            out = np.empty_like(v)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
            return out
        a, b = v[..., : d // 2], v[..., d // 2:]
        return np.concatenate((a * cos - b * sin, a * sin + b * cos), axis=-1)

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * g

    def lin(v, name):
        y = v @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["token_embd.weight"][ids]
    mask = np.triu(np.full((t_len, t_len), -np.inf), 1)
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope(lin(h, p + "attn_q").reshape(t_len, heads, d))
        k = np.repeat(rope(lin(h, p + "attn_k").reshape(t_len, kv, d)), heads // kv, axis=1)
        v = np.repeat(lin(h, p + "attn_v").reshape(t_len, kv, d), heads // kv, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(d) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + lin(np.einsum("hts,shd->thd", att, v).reshape(t_len, heads * d), p + "attn_output")
        h = rms(x, w[p + "ffn_norm.weight"])
        g = lin(h, p + "ffn_gate")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "ffn_up"), p + "ffn_down")
    out = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"]) @ out.T


def _torch_logits(comp, ids):
    lm = compress.load(comp)
    lm.model.float()  # the reference in float32 whatever dtype the directory keeps its 16-bit parts in
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()


def _check_against_compress(path, comp, permuted):
    """Every linear weight in the file dequantizes to compress's (q/k rows permuted back)."""
    from compress.qlinear import QuantLinear

    lm = compress.load(comp)
    cfg = lm.model.config
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for i, layer in enumerate(lm.model.model.layers):
        for hf, gg, heads in (("self_attn.q_proj", "attn_q", cfg.num_attention_heads),
                              ("self_attn.k_proj", "attn_k", cfg.num_key_value_heads),
                              ("mlp.down_proj", "ffn_down", None)):
            m = layer.get_submodule(hf)
            want = m.dequantized_weight() if isinstance(m, QuantLinear) else m.weight.detach().half().float()
            if permuted and heads:
                want = want[gb.rope_interleave_perm(want.shape[0], heads)]
            t = tensors[f"blk.{i}.{gg}.weight"]
            got = torch.from_numpy(gguf_dequantize(t.data, t.tensor_type))
            tol = 2.0 ** -10 * float(want.abs().max()) if t.tensor_type == T.Q4_1 else 0.0
            assert float((got - want).abs().max()) <= tol, (hf, i, t.tensor_type)


def test_llama_spm_mixed_plan(llama_spm, tmp_path):
    plan, comp = _mixed(llama_spm, tmp_path)
    out = tmp_path / "model.gguf"
    rep = export_gguf(comp, out)
    assert rep.architecture == "llama" and rep.validated and rep.f16_fallback == []
    assert rep.max_abs_err["Q4_0"] == 0.0 and rep.max_abs_err["Q8_0"] == 0.0 and rep.max_abs_err["F16"] == 0.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reader = GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for i, (name, lp) in enumerate(plan.layers.items()):
        blk, _, rest = name.removeprefix("model.layers.").partition(".")
        gg = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}[rest]
        assert types[f"blk.{blk}.{gg}.weight"] == EXPECT[(lp.bits, lp.group_size, lp.symmetric)], name
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and "rope_freqs.weight" not in types
    assert len(types) == 2 + 2 * 9 + 1
    _check_against_compress(out, comp, permuted=True)

    f = _fields(reader)
    cfg = json.loads((comp / "config.json").read_text())
    assert f["general.architecture"] == "llama"
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"]) == (128, 64, 2, 96)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"]) == (4, 2, 16)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0) and f["llama.vocab_size"] == 319
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    # Vocabulary: every Hugging Face token in id order (spaces as U+2581), padded to the embedding.
    tok = AutoTokenizer.from_pretrained(comp)
    vocab = {i: p for p, i in tok.get_vocab().items()}
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.tokens"]) == 319
    assert f["tokenizer.ggml.tokens"][:313] == [vocab[i].replace(" ", "\u2581") for i in range(313)]
    assert f["tokenizer.ggml.tokens"][313:] == [f"[PAD{i}]" for i in range(313, 319)]
    tt = f["tokenizer.ggml.token_type"]
    assert tt[0] == gguf.TokenType.UNKNOWN and tt[1] == tt[2] == gguf.TokenType.CONTROL
    assert set(tt[3:259]) == {gguf.TokenType.BYTE} and set(tt[313:]) == {gguf.TokenType.UNUSED}
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"] is True
    # llama.cpp's SPM tokenizer (merge the best-scored adjacent pair, run.c's algorithm) over the
    # file's tokens and scores reproduces the Hugging Face tokenizer.
    from compress.llama2c import reference_encode

    pieces = [p.replace("\u2581", " ") for p in f["tokenizer.ggml.tokens"]]
    for text in TEXT[:3] + ["the the thing was", "zz"]:
        assert reference_encode(text, pieces, f["tokenizer.ggml.scores"]) == tok(text)["input_ids"], text
    # The file alone, run as llama.cpp runs it, gives compress's logits (up to Q4_1's fp16 offsets,
    # 2^-11 of a weight: a wrong name, norm, bias or RoPE order would be O(1)).
    ids = tok(TEXT[0])["input_ids"][:20]
    ref = _torch_logits(comp, ids)
    got = torch.from_numpy(llama_cpp_reference(out, ids))
    assert float((got - ref).abs().max() / ref.abs().max()) < Q41_LOGIT_TOL


def test_llama_bpe_tied_llama3_rope(llama_bpe, tmp_path):
    _, comp = _mixed(llama_bpe, tmp_path)
    out = tmp_path / "model.gguf"
    rep = export_gguf(comp, out)
    reader = GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "rope_freqs.weight" in names  # tied head; llama3 RoPE
    f = _fields(reader)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert rep.tokenizer == "gpt2 (pre llama-bpe)"
    tok_json = json.loads((comp / "tokenizer.json").read_text())
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok_json["model"]["merges"]]
    assert f["tokenizer.ggml.merges"] == merges
    vocab = {i: p for p, i in tok_json["model"]["vocab"].items()}
    assert f["tokenizer.ggml.tokens"] == [vocab[i] for i in range(len(vocab))]
    assert f["tokenizer.ggml.token_type"][:2] == [gguf.TokenType.CONTROL] * 2
    # rope_freqs: the divisors that turn the base frequencies into transformers' llama3 ones.
    lm = compress.load(comp)
    inv = lm.model.model.rotary_emb.inv_freq.double()
    rf = torch.from_numpy(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data.astype(np.float64))
    base = 500000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(base / rf, inv, rtol=1e-6, atol=0)
    assert float(rf.max()) == pytest.approx(8.0) and float(rf.min()) < 2.0  # scaled, smoothed and kept
    _check_against_compress(out, comp, permuted=True)
    tok = AutoTokenizer.from_pretrained(comp)
    ids = tok(TEXT[1])["input_ids"][:24]
    ref, got = _torch_logits(comp, ids), torch.from_numpy(llama_cpp_reference(out, ids))
    assert float((got - ref).abs().max() / ref.abs().max()) < Q41_LOGIT_TOL


def test_qwen2_keeps_rotate_half_and_writes_biases(qwen2_bpe, tmp_path):
    _, comp = _mixed(qwen2_bpe, tmp_path, include_heads=True)
    out = tmp_path / "model.gguf"
    rep = export_gguf(comp, out)
    reader = GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert rep.architecture == "qwen2" and {"blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert _fields(reader)["tokenizer.ggml.pre"] == "qwen2"
    assert "lm_head" in rep.layers  # the planned head is quantized in the file too
    _check_against_compress(out, comp, permuted=False)
    tok = AutoTokenizer.from_pretrained(comp)
    ids = tok(TEXT[2])["input_ids"][:16]
    ref, got = _torch_logits(comp, ids), torch.from_numpy(llama_cpp_reference(out, ids))
    assert float((got - ref).abs().max() / ref.abs().max()) < Q41_LOGIT_TOL


@pytest.mark.slow
def test_stories260k(shared_data, tmp_path):
    from compress.models import resolve_model_path

    src = resolve_model_path("stories260k")
    p = compress.plan(src, bits=4, group_size=32, symmetric=True, target="any")  # g32 on K = 172 too
    comp = compress.apply(src, p, tmp_path / "comp", progress=False)
    with pytest.raises(CompressError, match=r"5 layers have no GGUF block type: model\.layers\.0\.mlp\.down_proj "
                                            r"\(int4 g32 sym, K=172 not a multiple of 32\)"):
        export_gguf(comp, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))
    rep = export_gguf(comp, tmp_path / "m.gguf", allow_f16=True)
    assert sorted(rep.f16_fallback) == [f"model.layers.{i}.mlp.down_proj" for i in range(5)]
    assert rep.tensor_types["Q4_0"] == 30 and rep.vocab_size == 512
    f = _fields(GGUFReader(tmp_path / "m.gguf"))
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.tokens"]) == 512
    from compress.llama2c import reference_encode

    tok = AutoTokenizer.from_pretrained(comp)
    text = (shared_data / "text" / "tinystories-sample.txt").read_text()[:600]
    pieces = [p.replace("\u2581", " ") for p in f["tokenizer.ggml.tokens"]]
    assert reference_encode(text, pieces, f["tokenizer.ggml.scores"]) == tok(text)["input_ids"]
    ids = tok(text)["input_ids"][:48]
    ref, got = _torch_logits(comp, ids), torch.from_numpy(llama_cpp_reference(tmp_path / "m.gguf", ids))
    # F16 down projections round compress's dequantized weights: far below the int4 error itself.
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-3


# ---- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spm_int4(llama_spm, tmp_path_factory):
    p = compress.plan(llama_spm, bits=4, group_size=32, symmetric=True)
    return compress.apply(llama_spm, p, tmp_path_factory.mktemp("spm4") / "comp", progress=False)


def test_existing_output_is_refused_and_replaced_with_overwrite(spm_int4, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    with pytest.raises(CompressError, match=r"output .*m.gguf exists; pass --overwrite to replace it"):
        export_gguf(spm_int4, out)
    assert out.read_text() == "keep me"
    with pytest.raises(CompressError, match=r"is a directory; give a file name such as .*model.gguf"):
        export_gguf(spm_int4, tmp_path)
    export_gguf(spm_int4, out, overwrite=True)
    assert GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_failed_validation_writes_nothing(spm_int4, tmp_path, monkeypatch):
    from compress.export import gguf_export

    real = gguf_export.collect_tensors

    def corrupt(*a, **k):
        tensors = real(*a, **k)
        t = next(t for t in tensors if t.kind == "Q4_0")
        t.expected = lambda e=t.expected: e() + 1.0
        return tensors

    monkeypatch.setattr(gguf_export, "collect_tensors", corrupt)
    with pytest.raises(CompressError, match=r"differs from compress's weights by 1 > 0; nothing was written"):
        export_gguf(spm_int4, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_not_a_llama_architecture(tmp_path, bert_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)
    OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    bert_tokenizer.save_pretrained(tmp_path / "opt")
    comp = compress.apply(tmp_path / "opt", compress.plan(tmp_path / "opt", bits=8), tmp_path / "comp", progress=False)
    with pytest.raises(CompressError, match=r"GGUF export supports the architectures LlamaForCausalLM, "
                                            r"MistralForCausalLM, Qwen2ForCausalLM; this model is OPTForCausalLM"):
        export_gguf(comp, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_wordpiece_tokenizer_is_refused(tiny_llama_dir, tmp_path):
    comp = compress.apply(tiny_llama_dir, compress.plan(tiny_llama_dir, bits=8), tmp_path / "comp", progress=False)
    with pytest.raises(CompressError, match=r"tokenizer model 'WordPiece' is not supported for GGUF"):
        export_gguf(comp, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_unknown_bpe_pre_tokenizer_is_refused(tmp_path):
    from compress.export.gguf_vocab import read_vocab

    tok = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}, "decoder": {"type": "ByteLevel"},
           "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"\w+|\s"}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CompressError, match=r"pre-tokenizer regex .* is not one llama.cpp is known to split"):
        read_vocab(tmp_path, 2)
    tok["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert read_vocab(tmp_path, 2).pre == "gpt-2"
    # A Llama 2 style tokenizer.json (Metaspace): pieces already hold U+2581, so none is rewritten.
    tok = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {"<unk>": 0, "\u2581a": 1, "b c": 2}, "merges": [],
                     "unk_token": "<unk>"}, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                                                               "prepend_scheme": "first"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    v = read_vocab(tmp_path, 3)
    assert v.tokens == ["<unk>", "\u2581a", "b c"] and v.add_space_prefix is True


def test_missing_gguf_names_the_package(spm_int4, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(CompressError, match=r"GGUF export needs the gguf package: pip install gguf"):
        export_gguf(spm_int4, tmp_path / "m.gguf")


def test_cli_export_gguf(spm_int4, tmp_path, capsys):
    from compress.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", str(spm_int4), "--format", "gguf", "-o", str(out), "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "tensors Q4_0" in printed and out.is_file()
    assert json.loads((tmp_path / "r.json").read_text())["tensor_types"]["Q4_0"] == 14
    assert main(["export", str(spm_int4), "-o", str(out)]) == 2  # .gguf chooses the format; exists
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --overwrite" in err[0]


def test_float_type_f32_for_llama_cpp_quantizer_input(spm_int4, tmp_path):
    rep = export_gguf(spm_int4, tmp_path / "m.gguf", float_type="F32")
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["token_embd.weight"] == types["output.weight"] == "F32" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert rep.max_abs_err["F32"] == 0.0
    with pytest.raises(CompressError, match=r"float_type must be F16, BF16 or F32, got 'F8'"):
        export_gguf(spm_int4, tmp_path / "n.gguf", float_type="F8")
