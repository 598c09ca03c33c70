"""A Hugging Face tokenizer (tokenizer.json) as llama.cpp's vocabulary metadata (tokenizer.ggml.*).

Two kinds of tokenizer.json are understood, the two llama.cpp runs for Llama-family models:

    SentencePiece-style BPE (model BPE with byte_fallback: Llama 2, Mistral, TinyLlama, and the
    llama2.c conversions of compress.llama2c) -> tokenizer.ggml.model "llama"
        llama.cpp's SPM tokenizer splits the text into characters (unknown ones into <0xNN> byte
        tokens) and repeatedly merges the adjacent pair whose concatenation is the token with the
        highest score. A tokenizer.json has merge ranks, not scores, so a token's score is minus
        the rank of the first merge that makes it: the same merges win in the same order.
        Spaces are written as U+2581 (what llama.cpp looks tokens up by); a vocabulary that holds
        plain spaces (the llama2.c conversions) has them replaced. add_space_prefix follows the
        normalizer / pre-tokenizer (Prepend, Metaspace).
    byte-level BPE (model BPE without byte fallback, ByteLevel decoder: Llama 3, Qwen2, GPT-2 style)
        -> tokenizer.ggml.model "gpt2" with its merges, and tokenizer.ggml.pre naming llama.cpp's
        pre-tokenizer: chosen by the tokenizer's own split regex (``PRE_TOKENIZERS``); an unknown
        regex is refused, since llama.cpp would split words differently without saying so.

Token types: <0xNN> byte pieces BYTE, the unknown token UNKNOWN, special added tokens CONTROL, other
added tokens USER_DEFINED, ids past the tokenizer's end (a model vocabulary padded beyond it) UNUSED
"[PAD<id>]" entries. Special ids (bos, eos, unk, pad), add_bos / add_eos and the chat template come
from the directory through gguf's SpecialVocab.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompressError

SPACE = "\u2581"
# The split regexes of tokenizer.json pre-tokenizers -> llama.cpp's tokenizer.ggml.pre names.
PRE_TOKENIZERS = {
    # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2 (digits one at a time)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    """What is written: llama.cpp tokenizer model, its pre-tokenizer, and per-token lists."""

    model: str                 # "llama" or "gpt2"
    pre: str | None            # tokenizer.ggml.pre ("default" for "llama")
    tokens: list[str]
    scores: list[float]
    types: list[int]           # gguf.TokenType values
    add_space_prefix: bool | None = None


def _steps(section: dict | None) -> list[dict]:
    """A tokenizer.json normalizer / pre-tokenizer as its list of steps (Sequence flattened)."""
    if not section:
        return []
    for key in ("normalizers", "pretokenizers"):
        if key in section:
            return [s for sub in section[key] for s in _steps(sub)]
    return [section]


def _gpt2_pre(tok: dict) -> str:
    steps = _steps(tok.get("pre_tokenizer"))
    splits = [s for s in steps if s.get("type") == "Split"]
    if splits:
        pattern = splits[0].get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
        raise CompressError(f"tokenizer.json: byte-level BPE pre-tokenizer regex {regex[:60]!r}... is not one "
                            f"llama.cpp is known to split the same way (known: Llama 3, Qwen2, GPT-2)")
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2"  # ByteLevel with its built-in regex is GPT-2's pre-tokenizer
    raise CompressError("tokenizer.json: byte-level BPE without a recognised pre-tokenizer "
                        "(known: Llama 3, Qwen2, GPT-2)")


def _token_types(tok: dict, n: int) -> tuple[list[int], dict[int, str]]:
    """Per-id token types and the added tokens by id."""
    import gguf

    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    types = [int(gguf.TokenType.NORMAL)] * n
    for i, a in added.items():
        if i < n:
            types[i] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    return types, {i: a["content"] for i, a in added.items()}


def read_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of the tokenizer.json in ``model_dir`` for a model of ``vocab_size``
    embedding rows (see the module docstring); CompressError for a tokenizer llama.cpp cannot run."""
    import gguf

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise CompressError(f"{model_dir}: GGUF export needs the tokenizer (tokenizer.json), none found")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise CompressError(f"{path}: tokenizer model {model.get('type')!r} is not supported for GGUF "
                            f"(supported: BPE with byte fallback, as Llama 2 / Mistral; byte-level BPE, "
                            f"as Llama 3 / Qwen2)")
    vocab: dict[str, int] = dict(model["vocab"])
    for a in tok.get("added_tokens", []):
        vocab.setdefault(a["content"], a["id"])
    n_tok = max(vocab.values()) + 1
    if n_tok > vocab_size:
        raise CompressError(f"{path}: the tokenizer has {n_tok} tokens but the model only {vocab_size} "
                            f"embedding rows")
    by_id: dict[int, str] = {}
    for piece, i in vocab.items():
        by_id.setdefault(i, piece)
    unk = model.get("unk_token")
    types, added = _token_types(tok, vocab_size)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    for i in range(vocab_size):
        if i not in by_id:
            types[i] = int(gguf.TokenType.UNUSED)
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]

    if model.get("byte_fallback"):
        steps = _steps(tok.get("normalizer")) + _steps(tok.get("pre_tokenizer"))
        uses_meta = any(s.get("type") == "Metaspace" or (s.get("type") == "Replace" and s.get("content") == SPACE)
                        or (s.get("type") == "Prepend" and s.get("prepend") == SPACE) for s in steps)
        prefix = any(s.get("type") == "Prepend" or (s.get("type") == "Metaspace" and
                                                   s.get("prepend_scheme", "always") in ("first", "always"))
                     for s in steps)
        rank: dict[str, int] = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
        for i, t in enumerate(tokens):
            if i in added:
                continue
            if _BYTE_PIECE.fullmatch(t):
                types[i] = int(gguf.TokenType.BYTE)
            elif t == unk:
                types[i] = int(gguf.TokenType.UNKNOWN)
            elif t.startswith("<llama2c-bytes-"):
                types[i] = int(gguf.TokenType.UNUSED)  # not valid UTF-8: encode() never yields it
        if unk in vocab and vocab[unk] < vocab_size:
            types[vocab[unk]] = int(gguf.TokenType.UNKNOWN)
        if not uses_meta:
            tokens = [t if i in added or types[i] == gguf.TokenType.UNUSED else t.replace(" ", SPACE)
                      for i, t in enumerate(tokens)]
        return Vocab("llama", "default", tokens, scores, types, add_space_prefix=prefix)

    decoder_types = {s.get("type") for s in _steps(tok.get("decoder"))} | {(tok.get("decoder") or {}).get("type")}
    if "ByteLevel" not in decoder_types:
        raise CompressError(f"{path}: a BPE tokenizer without byte fallback must be byte-level (ByteLevel "
                            f"decoder) for GGUF; this one decodes with {sorted(t for t in decoder_types if t)}")
    return Vocab("gpt2", _gpt2_pre(tok), tokens, [0.0] * vocab_size, types)


def add_vocab(writer, v: Vocab, model_dir: Path, vocab_size: int) -> None:
    """Write ``v`` (``read_vocab`` of ``model_dir``) and the directory's special tokens, add_bos /
    add_eos flags and chat template into a gguf.GGUFWriter."""
    import gguf

    writer.add_tokenizer_model(v.model)
    if v.pre:
        writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_scores(v.scores)
    writer.add_token_types(v.types)
    if v.add_space_prefix is not None:
        writer.add_add_space_prefix(v.add_space_prefix)
    special = gguf.SpecialVocab(model_dir, load_merges=v.model == "gpt2", n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
