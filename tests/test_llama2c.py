"""llama2.c -> Hugging Face conversion: weights against an independent llama2.c forward, the tokenizer
against a transcription of run.c's encode(), and the real stories260K model's known outputs."""
from __future__ import annotations

import json
import math
import random
import struct

import numpy as np
import pytest
import torch
import transformers

from compress import llama2c
from compress.data import shared_data_dir
from compress.errors import CompressError
from compress.llama2c import (build_hf_tokenizer, convert_llama2c, read_llama2c_checkpoint,
                              read_llama2c_tokenizer, reference_encode, stories260k_dir)

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def _layout(h: dict) -> list[tuple[str, tuple]]:
    """llama2.c's file order, written out again here so the test does not trust the module's copy."""
    d, f, n, v = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
    hs = d // h["n_heads"]
    kv = h["n_kv_heads"] * hs
    out = [("emb", (v, d)), ("rms_att", (n, d)), ("wq", (n, d, d)), ("wk", (n, kv, d)), ("wv", (n, kv, d)),
           ("wo", (n, d, d)), ("rms_ffn", (n, d)), ("w1", (n, f, d)), ("w2", (n, d, f)), ("w3", (n, f, d)),
           ("rms_final", (d,)), ("freq_real", (h["seq_len"], hs // 2)), ("freq_imag", (h["seq_len"], hs // 2))]
    return out + ([("wcls", (v, d))] if h["vocab_size"] < 0 else [])


def _write_checkpoint(path, h: dict, seed: int) -> dict[str, torch.Tensor]:
    """A random llama2.c checkpoint; returns its raw tensors (llama2.c layout, float32)."""
    g = torch.Generator().manual_seed(seed)
    raw = {}
    for name, shape in _layout(h):
        t = torch.randn(shape, generator=g)
        # Norm weights near 1 and projections large enough that attention is far from uniform,
        # so a wrong RoPE pairing changes the logits by much more than the tolerance.
        raw[name] = 1 + 0.1 * t if name.startswith("rms") else 0.5 * t
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *(h[k] for k in HEADER_FIELDS)))
        for name, _ in _layout(h):
            f.write(raw[name].numpy().astype("<f4").tobytes())
    return raw


def _read_raw(path) -> tuple[dict, dict[str, torch.Tensor]]:
    data = open(path, "rb").read()
    h = dict(zip(HEADER_FIELDS, struct.unpack_from("<7i", data), strict=True))
    flat = torch.from_numpy(np.frombuffer(data, "<f4", offset=28).copy())
    raw, off = {}, 0
    for name, shape in _layout(h):
        size = math.prod(shape)
        raw[name] = flat[off:off + size].reshape(shape)
        off += size
    assert off == flat.numel()
    return h, raw


def _llama2c_forward(h: dict, raw: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """run.c's transformer in float64: RoPE on adjacent pairs (2i, 2i+1), grouped-query attention.

    ids: T token ids. Returns logits (T, vocab), float64.
    """
    w = {k: v.double() for k, v in raw.items()}
    d, nh, nkv = h["dim"], h["n_heads"], h["n_kv_heads"]
    hs, T = d // nh, len(ids)
    x = w["emb"][torch.tensor(ids)]  # (T, D)
    freq = 1.0 / 10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq  # (T, hs/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (T, 1, hs/2)

    def rope(v, heads):  # (T, heads*hs) -> same, each adjacent pair rotated by its angle
        v = v.reshape(T, heads, hs // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(T, heads * hs)

    def rmsnorm(v, g):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-5) * g

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(h["n_layers"]):
        xb = rmsnorm(x, w["rms_att"][layer])
        q = rope(xb @ w["wq"][layer].T, nh).reshape(T, nh, hs)
        k = rope(xb @ w["wk"][layer].T, nkv).reshape(T, nkv, hs)
        v = (xb @ w["wv"][layer].T).reshape(T, nkv, hs)
        heads = []
        for i in range(nh):
            kv = i // (nh // nkv)
            att = (q[:, i] @ k[:, kv].T) / math.sqrt(hs)  # (T, T)
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append(att @ v[:, kv])
        x = x + torch.cat(heads, -1) @ w["wo"][layer].T
        xb = rmsnorm(x, w["rms_ffn"][layer])
        x = x + (torch.nn.functional.silu(xb @ w["w1"][layer].T) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    x = rmsnorm(x, w["rms_final"])
    return x @ (w["wcls"] if "wcls" in w else w["emb"]).T


def _hf_logits(config, sd, ids) -> torch.Tensor:
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def _assert_close_logits(got, want):
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= 1e-4 * scale, f"max |logit error| {err:.3g} vs logit scale {scale:.3g}"


# A small awkward model: head_size 8 but 6 query heads sharing 2 kv heads, odd hidden size.
SMALL = {"dim": 48, "hidden_dim": 100, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2, "vocab_size": 271,
         "seq_len": 19}


@pytest.mark.parametrize("untied", [False, True])
def test_random_checkpoint_matches_llama2c_forward(tmp_path, untied):
    h = dict(SMALL, vocab_size=-SMALL["vocab_size"] if untied else SMALL["vocab_size"])
    raw = _write_checkpoint(tmp_path / "m.bin", h, seed=1 + untied)
    config, sd = read_llama2c_checkpoint(tmp_path / "m.bin")
    assert (config.vocab_size, config.head_dim, config.num_key_value_heads) == (271, 8, 2)
    assert config.tie_word_embeddings is (not untied)
    assert config.max_position_embeddings == 19 and config.rms_norm_eps == 1e-5
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert all(t.dtype == torch.float32 for t in sd.values())
    ids = torch.randint(0, 271, (19,), generator=torch.Generator().manual_seed(7)).tolist()
    _assert_close_logits(_hf_logits(config, sd, ids), _llama2c_forward(h, raw, ids))


def _small_vocab(seed: int) -> tuple[list[str], list[float]]:
    """A llama2.c-style vocabulary: 3 specials, 256 byte pieces, characters and merged pieces with
    shuffled distinct scores (run.c does not need a merged piece to score below its parts)."""
    words = [" ", "a", "b", "c", "d", "e", "é", "中", "\n", "ab", "bc", "abc", " a", " ab", "cd", "de", "cde",
             " abc", "éd", "中中", "ea", "eab", " d", "dé"]
    scores = [-float(s) for s in random.Random(seed).sample(range(1, 10 * len(words)), len(words))]
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + words
    return pieces, [0.0] * 259 + scores


def _write_tokenizer(path, pieces, scores):
    blobs = [p.encode() if isinstance(p, str) else p for p in pieces]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(map(len, blobs))))
        for b, s in zip(blobs, scores, strict=True):
            f.write(struct.pack("<fi", s, len(b)) + b)


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdeé中 \nxyz€\t😀"  # x, y, z, €, tab and the emoji are not pieces: byte fallback
    return [""] + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(n)]


def test_synthetic_tokenizer_matches_run_c_encode():
    pieces, scores = _small_vocab(seed=3)
    tok = build_hf_tokenizer(pieces, scores)
    texts = _random_texts(300, seed=4) + ["<s>", "<unk></s>", "  ab  "]
    for text in texts:
        ids = tok(text).input_ids
        assert ids == reference_encode(text, pieces, scores), repr(text)
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_convert_round_trip_synthetic(tmp_path):
    h = dict(SMALL, vocab_size=-(259 + 24))
    raw = _write_checkpoint(tmp_path / "m.bin", h, seed=5)
    pieces, scores = _small_vocab(seed=6)
    _write_tokenizer(tmp_path / "tok.bin", pieces, scores)
    # max_len 6: "<0x00>" is the longest piece.
    assert read_llama2c_tokenizer(tmp_path / "tok.bin", len(pieces)) == (pieces, scores, 6)
    out = convert_llama2c(tmp_path / "m.bin", tmp_path / "tok.bin", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.bin", "tok.bin"]  # no temporary left
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert not model.config.tie_word_embeddings
    text = "abcde 中中 éd"
    ids = tok(text).input_ids
    assert ids == reference_encode(text, pieces, scores)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double()
    _assert_close_logits(got, _llama2c_forward(h, raw, ids))
    marker = json.loads((out / llama2c.MARKER_NAME).read_text())
    assert marker["checkpoint"]["name"] == "m.bin" and len(marker["tokenizer"]["sha256"]) == 64


def test_truncated_or_impossible_checkpoint(tmp_path):
    _write_checkpoint(tmp_path / "m.bin", SMALL, seed=8)
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    with pytest.raises(CompressError, match=f"implies {len(data)} bytes, file has {len(data) - 4}"):
        read_llama2c_checkpoint(tmp_path / "cut.bin")
    (tmp_path / "long.bin").write_bytes(data + b"\0" * 8)
    with pytest.raises(CompressError, match=f"implies {len(data)} bytes, file has {len(data) + 8}"):
        read_llama2c_checkpoint(tmp_path / "long.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(CompressError, match="10 bytes is shorter than its 28-byte header"):
        read_llama2c_checkpoint(tmp_path / "tiny.bin")
    (tmp_path / "heads.bin").write_bytes(struct.pack("<7i", 48, 100, 2, 6, 4, 271, 19) + data[28:])
    with pytest.raises(CompressError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        read_llama2c_checkpoint(tmp_path / "heads.bin")
    with pytest.raises(CompressError, match="llama2.c checkpoint not found: .*absent.bin"):
        read_llama2c_checkpoint(tmp_path / "absent.bin")


def test_bad_tokenizer_file(tmp_path):
    pieces, scores = _small_vocab(seed=9)
    _write_tokenizer(tmp_path / "tok.bin", pieces, scores)
    data = (tmp_path / "tok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-3])
    with pytest.raises(CompressError, match=f"record {len(pieces) - 1} has length"):
        read_llama2c_tokenizer(tmp_path / "cut.bin", len(pieces))
    with pytest.raises(CompressError, match=f"{len(pieces) - 1} records end at byte"):
        read_llama2c_tokenizer(tmp_path / "tok.bin", len(pieces) - 1)
    with pytest.raises(CompressError, match="token 3 is '<0x01>', expected the byte piece '<0x00>'"):
        build_hf_tokenizer(pieces[:3] + pieces[4:] + ["zz"], scores)


def test_existing_or_missing_paths(tmp_path):
    pieces, scores = _small_vocab(seed=11)
    _write_tokenizer(tmp_path / "tok.bin", pieces, scores)
    _write_checkpoint(tmp_path / "m.bin", dict(SMALL, vocab_size=len(pieces)), seed=10)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stray.txt").write_text("x")
    with pytest.raises(CompressError, match=f"output directory already exists: {out}"):
        convert_llama2c(tmp_path / "m.bin", tmp_path / "tok.bin", out)
    assert (out / "stray.txt").exists()
    convert_llama2c(tmp_path / "m.bin", tmp_path / "tok.bin", out, overwrite=True)
    assert not (out / "stray.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.bin", "tok.bin"]
    with pytest.raises(CompressError, match=f"llama2.c tokenizer not found: {tmp_path / 'nope.bin'}"):
        convert_llama2c(tmp_path / "m.bin", tmp_path / "nope.bin", tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()


def test_convert_llama2c_cli(tmp_path, capsys):
    """`compress convert-llama2c BIN TOKENIZER -o DIR`: writes, refuses DIR after, replaces with --overwrite."""
    from compress.cli import main

    pieces, scores = _small_vocab(seed=12)
    _write_tokenizer(tmp_path / "tok.bin", pieces, scores)
    _write_checkpoint(tmp_path / "m.bin", dict(SMALL, vocab_size=len(pieces)), seed=13)
    args = ["convert-llama2c", str(tmp_path / "m.bin"), str(tmp_path / "tok.bin"), "-o", str(tmp_path / "hf")]
    assert main(args) == 0 and (tmp_path / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.bin", "tok.bin"]
    assert main(["convert-llama2c", str(tmp_path / "absent.bin"), str(tmp_path / "tok.bin"),
                 "-o", str(tmp_path / "x")]) == 2
    assert "llama2.c checkpoint not found" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_stories260k_found_beside_the_working_directory(tmp_path, monkeypatch):
    """A non-editable install cannot find ../shared/data from its package; it is found from the
    current directory (a checkout with the data beside it), before the package's own root."""
    from compress.models import resolve_model_path

    src = tmp_path / "shared" / "data" / "models" / "stories260K"
    src.mkdir(parents=True)
    pieces, scores = _small_vocab(seed=14)
    _write_tokenizer(src / "tok512.bin", pieces, scores)
    _write_checkpoint(src / "stories260K.bin", dict(SMALL, vocab_size=len(pieces)), seed=15)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.delenv("COMPRESS_DATA", raising=False)
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    assert llama2c.shared_data_candidates()[0] == tmp_path / "shared" / "data"
    out = resolve_model_path("stories260k")
    assert out == tmp_path / "cache" / "stories260K-hf"
    marker = json.loads((out / llama2c.MARKER_NAME).read_text())
    assert marker["checkpoint"]["sha256"] == llama2c._sha256(src / "stories260K.bin")  # this copy, not another
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path / "elsewhere"))
    assert llama2c.shared_data_candidates()[0] == tmp_path / "elsewhere"  # the variable comes first


# ---- the real stories260K model (needs ../shared/data) ----

def _stories_src():
    data = shared_data_dir()
    src = data / "models" / "stories260K" if data is not None else None
    if src is None or not (src / "stories260K.bin").is_file() or not (src / "tok512.bin").is_file():
        pytest.skip("shared data models/stories260K absent (set COMPRESS_DATA or provide ../shared/data)")
    return src


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """(hf_dir, model, tokenizer, pieces, scores) for the converted real stories260K."""
    src = _stories_src()
    out = stories260k_dir(tmp_path_factory.mktemp("cache") / "stories260K-hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    pieces, scores, _ = read_llama2c_tokenizer(src / "tok512.bin", 512)
    return out, model, tok, pieces, scores


def _sample_stories() -> list[str]:
    text = (shared_data_dir() / "text" / "tinystories-sample.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    assert len(stories) == 5
    return stories


def test_tokenizer_matches_run_c_encode(stories):
    _, _, tok, pieces, scores = stories
    assert reference_encode("Once upon a time", pieces, scores) == [1, 403, 407, 261, 378]
    lines = (shared_data_dir() / "text" / "wikitext2-test.txt").read_text(encoding="utf-8").splitlines()
    wiki = [line for line in lines if line.strip()][::20]
    assert any("<unk>" in line for line in wiki) and any(not line.isascii() for line in wiki)
    odd = ["", " ", "  two  spaces ", "<s>Once</s> <unk>", "naïve café — “quotes” 😀 中文 \u200a€â™",
           "\x01\x02\x7f\x1b[0m", "tab\tnew\nline\r\n", "ÿþ\ufeff\U0010ffff"]
    for text in _sample_stories() + wiki + odd:
        ids = tok(text).input_ids
        assert ids == reference_encode(text, pieces, scores), repr(text[:80])
        assert tok.decode(ids, skip_special_tokens=True) == text, repr(text[:80])


def test_greedy_generation_matches_llama2c(stories):
    _, model, _, _, _ = stories
    prompt = torch.tensor([[1, 403, 407, 261, 378]])  # <s> "Once upon a time"
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out[0, 5:].tolist() == [432, 383, 286, 261, 376, 298]


def test_mean_nll_on_sample_stories(stories):
    """Token-weighted mean: total NLL of every next token over all 5 stories / number of predictions
    (each story tokenised with BOS, no EOS; all are shorter than seq_len 512)."""
    _, model, tok, _, _ = stories
    total, count = 0.0, 0
    for story in _sample_stories():
        ids = torch.tensor([tok(story).input_ids])
        assert ids.shape[1] <= model.config.max_position_embeddings
        with torch.no_grad():
            logits = model(ids).logits[0]
        total += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert 1.2 < total / count < 1.35, total / count


def test_real_model_matches_llama2c_forward(stories):
    src = _stories_src()
    _, model, _, _, _ = stories
    h, raw = _read_raw(src / "stories260K.bin")
    ids = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(12)).tolist()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double()
    _assert_close_logits(got, _llama2c_forward(h, raw, ids))


def test_stories260k_dir_cache(stories, tmp_path, monkeypatch):
    cached = stories[0]
    marker = cached / llama2c.MARKER_NAME
    before = marker.stat().st_mtime_ns
    assert stories260k_dir(cached) == cached and marker.stat().st_mtime_ns == before  # reused
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "root"))
    out = stories260k_dir()
    assert out == tmp_path / "root" / "stories260K-hf" and (out / "model.safetensors").is_file()
    stale = json.loads((out / llama2c.MARKER_NAME).read_text())
    stale["checkpoint"]["sha256"] = "0" * 64
    (out / llama2c.MARKER_NAME).write_text(json.dumps(stale))
    assert stories260k_dir() == out
    assert json.loads((out / llama2c.MARKER_NAME).read_text())["checkpoint"]["sha256"] != "0" * 64
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CompressError, match=f"cache directory {foreign} exists but is not a llama2.c"):
        stories260k_dir(foreign)
    nowhere = [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setattr(llama2c, "shared_data_candidates", lambda: nowhere)
    with pytest.raises(CompressError, match="stories260k needs models/stories260K") as err:
        stories260k_dir(tmp_path / "other")
    assert all(str(p / "models" / "stories260K") in str(err.value) for p in nowhere)
