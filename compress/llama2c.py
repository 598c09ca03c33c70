"""Convert llama2.c checkpoints ("legacy v0" .bin) and tokenizers into Hugging Face Llama directories.

llama2.c (github karpathy/llama2.c) stores a model as seven little-endian int32 header fields followed
by float32 tensors in a fixed order, and a tokenizer as (max_len, then one (score, length, bytes) record
per token). The converted directory loads offline with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` (no remote code): the weights become a ``LlamaForCausalLM`` and the
tokenizer becomes a ``tokenizers`` BPE whose encoding equals run.c's ``encode()``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_directory
from .data import shared_data_candidates
from .errors import CompressError

# run.c hard-codes these ids; the tokenizer file stores their pieces as "<unk>", "\n<s>\n", "\n</s>\n".
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL_NAMES = {UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
# Byte b falls back to token id b + 3, whose piece is "<0xNN>" (sentencepiece's byte pieces).
_BYTE_OFFSET = 3
_RMS_NORM_EPS = 1e-5
_ROPE_THETA = 10000.0
_HEADER = struct.Struct("<7i")
_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# Written last into every converted directory; stories260k_dir() trusts a cache only if it matches.
MARKER_NAME = "llama2c_source.json"
# Bump when the converted directory's contents change, so stale caches are rebuilt.
_CONVERTER_VERSION = 1
_OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", MARKER_NAME)


def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{what} not found: {path}")
    return path


def _tensor_layout(h: dict[str, int], shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The float32 tensors after the header, in file order, with their llama2.c shapes."""
    dim, hidden, n_layers, vocab = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    head_size = dim // h["n_heads"]
    kv_dim = h["n_kv_heads"] * head_size
    layout = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        # RoPE tables that run.c skips over: it recomputes the rotation on the fly.
        ("freq_cis_real", (h["seq_len"], head_size // 2)),
        ("freq_cis_imag", (h["seq_len"], head_size // 2)),
    ]
    if not shared:
        layout.append(("wcls", (vocab, dim)))
    return layout


def _interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a q/k projection from llama2.c's RoPE layout to Hugging Face's.

    w: (n_heads * head_size, in_features). llama2.c rotates adjacent pairs (2i, 2i+1) of each head;
    transformers' ``rotate_half`` pairs i with i + head_size/2, so within each head the even rows move
    to the first half and the odd rows to the second (as llama2.c's export.py does). Returns the same
    shape and dtype.
    """
    rows, cols = w.shape
    head_size = rows // n_heads
    return w.reshape(n_heads, head_size // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_llama2c_checkpoint(path: str | os.PathLike):
    """Parse a llama2.c "legacy v0" checkpoint into a LlamaConfig and a Hugging Face state dict.

    Returns ``(config, state_dict)``: float32 tensors named as in ``LlamaForCausalLM``, shapes
    (out_features, in_features) for projections, (vocab, dim) for the embedding, (dim,) for norms;
    q_proj/k_proj rows are permuted for rotate-half RoPE. A negative vocab_size in the header means an
    untied classifier stored after the RoPE tables (llama2.c's convention): then
    ``tie_word_embeddings`` is False and ``lm_head.weight`` is that classifier; otherwise
    ``lm_head.weight`` is the embedding tensor itself. Raises CompressError for a missing file, an
    impossible header, or a file size other than the one the header implies.
    """
    from transformers import LlamaConfig

    path = _require_file(path, "llama2.c checkpoint")
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise CompressError(f"llama2.c checkpoint {path}: {len(data)} bytes is shorter than its "
                            f"{_HEADER.size}-byte header")
    h = dict(zip(_HEADER_FIELDS, _HEADER.unpack_from(data), strict=True))
    shared = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    for name, value in h.items():
        if value <= 0:
            raise CompressError(f"llama2.c checkpoint {path}: header field {name}={value} must be positive")
    if h["dim"] % h["n_heads"] or (h["dim"] // h["n_heads"]) % 2:
        raise CompressError(f"llama2.c checkpoint {path}: dim={h['dim']} must split into n_heads="
                            f"{h['n_heads']} heads of even size")
    if h["n_heads"] % h["n_kv_heads"]:
        raise CompressError(f"llama2.c checkpoint {path}: n_heads={h['n_heads']} is not a multiple of "
                            f"n_kv_heads={h['n_kv_heads']}")
    layout = _tensor_layout(h, shared)
    n_floats = sum(int(np.prod(shape)) for _, shape in layout)
    expected = _HEADER.size + 4 * n_floats
    if len(data) != expected:
        header = ", ".join(f"{k}={v}" for k, v in h.items())
        raise CompressError(f"llama2.c checkpoint {path}: header ({header}, "
                            f"{'shared' if shared else 'separate'} classifier) implies {expected} bytes, "
                            f"file has {len(data)}")

    flat = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=_HEADER.size).astype(np.float32))
    raw, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        raw[name] = flat[offset:offset + size].reshape(shape)
        offset += size

    head_size = h["dim"] // h["n_heads"]
    config = LlamaConfig(
        vocab_size=h["vocab_size"], hidden_size=h["dim"], intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"], num_attention_heads=h["n_heads"],
        num_key_value_heads=h["n_kv_heads"], head_dim=head_size, max_position_embeddings=h["seq_len"],
        rms_norm_eps=_RMS_NORM_EPS, rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA},
        hidden_act="silu", tie_word_embeddings=shared, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        dtype=torch.float32, architectures=["LlamaForCausalLM"],
    )
    sd = {"model.embed_tokens.weight": raw["token_embedding"]}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = raw["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = _interleaved_to_halves(raw["wq"][i], h["n_heads"])
        sd[p + "self_attn.k_proj.weight"] = _interleaved_to_halves(raw["wk"][i], h["n_kv_heads"])
        sd[p + "self_attn.v_proj.weight"] = raw["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = raw["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = raw["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = raw["w1"][i]
        sd[p + "mlp.down_proj.weight"] = raw["w2"][i]
        sd[p + "mlp.up_proj.weight"] = raw["w3"][i]
    sd["model.norm.weight"] = raw["rms_final"]
    # Own contiguous copies: safetensors refuses strided views, and views would keep all of flat alive.
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if shared else raw["wcls"].clone()
    return config, sd


def read_llama2c_tokenizer(path: str | os.PathLike, vocab_size: int):
    """Parse a llama2.c tokenizer file: int32 max_token_len, then vocab_size records of
    (float32 score, int32 byte length, bytes).

    Returns ``(pieces, scores, max_len)``: pieces[i] is a ``str`` when its bytes are valid UTF-8,
    else ``bytes``; scores[i] a Python float. Raises CompressError for a missing file, a truncated
    record, bytes left over after the last record, or a piece longer than max_len.
    """
    path = _require_file(path, "llama2.c tokenizer")
    data = path.read_bytes()
    if vocab_size <= 0:
        raise CompressError(f"llama2.c tokenizer {path}: vocab_size={vocab_size} must be positive")
    if len(data) < 4:
        raise CompressError(f"llama2.c tokenizer {path}: {len(data)} bytes is shorter than its 4-byte header")
    (max_len,) = struct.unpack_from("<i", data)
    pieces: list[str | bytes] = []
    scores: list[float] = []
    offset = 4
    for i in range(vocab_size):
        if offset + 8 > len(data):
            raise CompressError(f"llama2.c tokenizer {path}: ends at byte {len(data)} inside record {i} "
                                f"of {vocab_size}")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or length > max_len or offset + length > len(data):
            raise CompressError(f"llama2.c tokenizer {path}: record {i} has length {length} (max_token_len="
                                f"{max_len}, {len(data) - offset} bytes left)")
        raw = data[offset:offset + length]
        offset += length
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append(raw)
        scores.append(score)
    if offset != len(data):
        raise CompressError(f"llama2.c tokenizer {path}: {vocab_size} records end at byte {offset} but the "
                            f"file has {len(data)} bytes (vocab_size mismatch?)")
    return pieces, scores, max_len


def reference_encode(text: str, pieces: list[str | bytes], scores: list[float]) -> list[int]:
    """run.c's ``encode(text, bos=1, eos=0)`` transcribed into plain Python; the slow reference.

    BOS, then the " " token when text is non-empty, then one token per UTF-8 character (an unknown
    character becomes one token per byte, id = byte + 3), then repeatedly merge the adjacent pair whose
    concatenated piece is in the vocabulary with the highest score (the leftmost on ties) until no pair
    merges. Unlike C, a NUL character does not end the text. Returns token ids (ints).
    """
    as_bytes = [p if isinstance(p, bytes) else p.encode("utf-8") for p in pieces]
    lookup: dict[bytes, int] = {}
    for i, p in enumerate(as_bytes):
        lookup.setdefault(p, i)
    tokens = [BOS_ID]
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        if b in lookup:
            tokens.append(lookup[b])
        else:
            tokens.extend(byte + _BYTE_OFFSET for byte in b)
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(as_bytes[tokens[i]] + as_bytes[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx:best_idx + 2] = [best_id]


def _hf_names(pieces: list[str | bytes]) -> list[str]:
    """The token strings of the Hugging Face vocabulary, index = id.

    The three special ids get the usual names; a piece that is not valid UTF-8 cannot be a vocabulary
    string and can never come out of encode() (run.c only concatenates whole characters), so it gets a
    placeholder name.
    """
    names = []
    for i, p in enumerate(pieces):
        if i in _SPECIAL_NAMES:
            names.append(_SPECIAL_NAMES[i])
        elif isinstance(p, bytes):
            names.append(f"<llama2c-bytes-{p.hex()}>")
        else:
            names.append(p)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise CompressError(f"llama2.c tokenizer: token {i} {name!r} duplicates token {seen[name]}")
        seen[name] = i
    return names


def _merges(pieces: list[str | bytes], scores: list[float], names: list[str]) -> list[tuple[str, str]]:
    """All pairs (a, b) of pieces whose concatenation a + b is a piece, best merged score first.

    run.c merges whichever adjacent pair makes the highest-scoring piece, so a pair's BPE rank is its
    merged piece's score. Pairs that make the same piece share a score in run.c (leftmost wins) but
    need distinct ranks here; they are ordered by split point, which only matters for periodic pieces
    such as "aaa" = "a"+"aa" = "aa"+"a" meeting in an overlapping run.
    """
    index = {p: i for i, p in enumerate(pieces) if isinstance(p, str)}
    ranked = []
    for merged, p in enumerate(pieces):
        if not isinstance(p, str):
            continue
        for k in range(1, len(p)):
            left, right = index.get(p[:k]), index.get(p[k:])
            if left is None or right is None:
                continue
            for i in (merged, left, right):
                if names[i] != pieces[i]:
                    raise CompressError(f"llama2.c tokenizer: piece {pieces[i]!r} (id {i}) takes part in the "
                                        f"merge {p[:k]!r} + {p[k:]!r}, which the Hugging Face vocabulary, "
                                        f"naming it {names[i]!r}, cannot express")
            ranked.append((-scores[merged], merged, k, (names[left], names[right])))
    ranked.sort()
    return [pair for *_, pair in ranked]


def build_hf_tokenizer(pieces: list[str | bytes], scores: list[float]):
    """A ``PreTrainedTokenizerFast`` over a ``tokenizers`` BPE that encodes exactly as run.c does.

    pieces/scores as returned by read_llama2c_tokenizer (ids 1 and 2 are BOS and EOS, ids 3..258 the
    byte pieces "<0x00>".."<0xFF>", and " " must be a piece). Encoding: a Prepend(" ") normalizer for
    the dummy prefix (skipped on empty text, like run.c), no pre-tokenizer (the whole text is one
    word), BPE with byte fallback whose merges are every vocabulary pair ranked by merged score, and a
    template adding BOS. Special-token strings in the text are not treated as special (run.c never
    does). Decoding strips the dummy space: ``decode(encode(t), skip_special_tokens=True) == t``; like
    the Hugging Face Llama tokenizer (and unlike run.c, which strips only right after BOS) it drops the
    leading space of any decoded sequence.
    Equality with run.c holds when no two distinct merged pieces share a score (see ``_merges``).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(pieces) != len(scores):
        raise CompressError(f"llama2.c tokenizer: {len(pieces)} pieces but {len(scores)} scores")
    if len(pieces) < _BYTE_OFFSET + 256:
        raise CompressError(f"llama2.c tokenizer: {len(pieces)} tokens, need at least {_BYTE_OFFSET + 256} "
                            f"(3 special + 256 byte pieces)")
    for b in range(256):
        if pieces[b + _BYTE_OFFSET] != f"<0x{b:02X}>":
            raise CompressError(f"llama2.c tokenizer: token {b + _BYTE_OFFSET} is {pieces[b + _BYTE_OFFSET]!r}, "
                                f"expected the byte piece '<0x{b:02X}>'")
    if " " not in pieces:
        raise CompressError("llama2.c tokenizer: no ' ' piece for run.c's dummy prefix")
    names = _hf_names(pieces)
    bpe = models.BPE(vocab={name: i for i, name in enumerate(names)}, merges=_merges(pieces, scores, names),
                     unk_token=_SPECIAL_NAMES[UNK_ID], byte_fallback=True, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Prepend(" ")
    bos = _SPECIAL_NAMES[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, BOS_ID)])
    # Fuse before Strip so only the dummy space at the very start is removed, as the Llama tokenizer does.
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=_SPECIAL_NAMES[EOS_ID],
        unk_token=_SPECIAL_NAMES[UNK_ID], split_special_tokens=True, clean_up_tokenization_spaces=False,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _marker(bin_path: Path, tokenizer_path: Path) -> dict:
    """What a converted directory records about its sources; equal markers mean an equal conversion."""
    return {
        "format": "compress.llama2c", "version": _CONVERTER_VERSION,
        "checkpoint": {"name": bin_path.name, "sha256": _sha256(bin_path)},
        "tokenizer": {"name": tokenizer_path.name, "sha256": _sha256(tokenizer_path)},
    }


def convert_llama2c(bin_path: str | os.PathLike, tokenizer_path: str | os.PathLike,
                    out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a llama2.c checkpoint + tokenizer into a Hugging Face LlamaForCausalLM directory.

    Writes config.json, generation_config.json, model.safetensors (float32; lm_head omitted when tied),
    tokenizer.json, tokenizer_config.json and a provenance marker (sha256 of both sources). The
    directory is built under a temporary sibling name and renamed into place when complete, so a
    reader never sees half of it. An existing out_dir is refused unless ``overwrite``. Returns out_dir.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    bin_path = _require_file(bin_path, "llama2.c checkpoint")
    tokenizer_path = _require_file(tokenizer_path, "llama2.c tokenizer")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CompressError(f"output directory already exists: {out} (pass --overwrite / overwrite=True "
                            f"to replace it)")
    if out.exists() and not out.is_dir():
        raise CompressError(f"output path exists and is not a directory: {out}")
    config, sd = read_llama2c_checkpoint(bin_path)
    pieces, scores, _ = read_llama2c_tokenizer(tokenizer_path, config.vocab_size)
    tokenizer = build_hf_tokenizer(pieces, scores)
    tokenizer.model_max_length = config.max_position_embeddings
    if config.tie_word_embeddings:
        # transformers re-ties lm_head to the embedding on load; safetensors cannot store shared memory.
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}

    with atomic_directory(out) as tmp:
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID).save_pretrained(tmp)
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER_NAME).write_text(json.dumps(_marker(bin_path, tokenizer_path), indent=2) + "\n")
    return out


def _is_current(out: Path, bin_path: Path, tokenizer_path: Path) -> bool:
    """Whether out is a complete conversion of exactly these sources by this converter version."""
    if not all((out / name).is_file() for name in _OUTPUT_FILES):
        return False
    try:
        recorded = json.loads((out / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return recorded == _marker(bin_path, tokenizer_path)


def stories260k_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory of the real TinyStories stories260K model, converted once and cached.

    Source: ``models/stories260K/{stories260K.bin, tok512.bin}`` in the first folder of
    ``compress.data.shared_data_candidates()`` that holds both ($COMPRESS_DATA, then ../shared/data
    relative to the current directory and to the package's source root). cache_dir is the converted
    directory itself; by default ``$COMPRESS_CACHE/stories260K-hf`` when that variable is set, else
    ``~/.cache/compress/stories260K-hf``. An existing directory is reused when its marker matches the
    sources' sha256, rebuilt when it is a stale conversion, and refused when it is something else.
    Raises CompressError naming every folder looked in when none holds the files.
    """
    looked = [cand / "models" / "stories260K" for cand in shared_data_candidates()]
    src = next((d for d in looked if (d / "stories260K.bin").is_file() and (d / "tok512.bin").is_file()), None)
    if src is None:
        raise CompressError("stories260k needs models/stories260K/stories260K.bin and tok512.bin from the shared "
                            f"data; looked in {', '.join(map(str, looked))} (set COMPRESS_DATA to the data folder)")
    bin_path, tokenizer_path = src / "stories260K.bin", src / "tok512.bin"
    if cache_dir is not None:
        out = Path(cache_dir)
    elif os.environ.get("COMPRESS_CACHE"):
        out = Path(os.environ["COMPRESS_CACHE"]) / "stories260K-hf"
    else:
        out = Path.home() / ".cache" / "compress" / "stories260K-hf"
    if _is_current(out, bin_path, tokenizer_path):
        return out
    if out.exists() and not (out / MARKER_NAME).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise CompressError(f"cache directory {out} exists but is not a llama2.c conversion (no {MARKER_NAME}); "
                            f"remove it or pass another cache_dir")
    try:
        return convert_llama2c(bin_path, tokenizer_path, out, overwrite=True)
    except OSError:
        # Another process may have renamed its finished conversion into place first.
        if _is_current(out, bin_path, tokenizer_path):
            return out
        raise
