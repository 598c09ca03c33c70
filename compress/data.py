"""Calibration and evaluation text: files, the embedded default corpus, tokenisation and batching;
labelled text files (text,label) for anytime heads."""
from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import torch

from .errors import CompressError
from .models import cap_to_context

TASKS = ("classification", "regression")  # what a labels file (and an anytime head) can hold


def shared_data_candidates() -> list[Path]:
    """Every folder where the shared evaluation data may be, in the order they are tried.

    ``$COMPRESS_DATA`` when set; ``../shared/data`` relative to the current directory (a repository
    checkout run from its root, with the data beside it); and ``../shared/data`` relative to the
    package's source root (an editable install run from anywhere). A non-editable ``pip install .``
    copies the package into site-packages, where only the first two can find the data.
    """
    env = os.environ.get("COMPRESS_DATA")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    unique: list[Path] = []
    for cand in candidates:
        if cand.resolve() not in {u.resolve() for u in unique}:
            unique.append(cand)
    return unique


def shared_data_dir() -> Path | None:
    """The first existing folder of shared_data_candidates(), or None when there is none.

    Nothing from it is ever committed into the repository; tests that need it skip without it.
    """
    for cand in shared_data_candidates():
        if cand.is_dir():
            return cand
    return None


ENDOFTEXT = "<|endoftext|>"


def load_texts(source: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Texts for calibration or evaluation, non-empty and stripped.

    source: None for the embedded default corpus (English prose that ships with CPython, so it
    needs no download); a .txt file (one text per non-empty line, or documents separated by
    ``<|endoftext|>`` when the file uses that marker); a .jsonl file with a "text" field; or a
    directory saved by ``datasets.Dataset.save_to_disk`` (needs the ``datasets`` package).
    """
    if source is None:
        texts = default_corpus()
    else:
        path = Path(source)
        if not path.exists():
            raise CompressError(f"calibration/evaluation data {path} does not exist")
        if path.is_dir():
            texts = _dataset_dir_texts(path)
        elif path.suffix == ".jsonl":
            texts = _jsonl_texts(path)
        else:
            raw = path.read_text(encoding="utf-8", errors="replace")
            parts = raw.split(ENDOFTEXT) if ENDOFTEXT in raw else raw.splitlines()
            texts = [t.strip() for t in parts]
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise CompressError(f"{path} holds no text (empty, or only blank lines)")
    return texts[:limit] if limit else texts


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CompressError(f"{path} line {i}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or "text" not in row:
            raise CompressError(f"{path} line {i}: no \"text\" field")
        texts.append(str(row["text"]).strip())
    return texts


def _dataset_dir_texts(path: Path) -> list[str]:
    try:
        from datasets import load_from_disk
    except ImportError as exc:
        raise CompressError(f"{path} is a directory: reading a saved dataset needs `pip install datasets`") from exc
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: take its first split
        ds = ds[next(iter(ds.keys()))]
    if "text" not in ds.column_names:
        raise CompressError(f"dataset {path} has no 'text' column (columns: {ds.column_names})")
    return [str(t).strip() for t in ds["text"]]


def default_corpus() -> list[str]:
    """Paragraphs of the Python documentation's topic help, bundled with CPython (pydoc_data)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            text = " ".join(para.split())
            # Keep prose, not code listings or tables: long enough and mostly letters.
            if len(text) > 200 and sum(c.isalpha() or c == " " for c in text) > 0.85 * len(text):
                paragraphs.append(text)
    return paragraphs


def sample_texts(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """n texts drawn without replacement, reproducibly (all of them, shuffled, if fewer)."""
    rng = random.Random(seed)
    idx = list(range(len(texts)))
    rng.shuffle(idx)
    return [texts[i] for i in idx[:n]]


def token_stream_batches(tokenizer, texts: list[str], seq_len: int, n_sequences: int) -> torch.Tensor:
    """Causal-LM windows: texts tokenised, joined by EOS, cut into n non-overlapping sequences.

    Returns int64 (n, seq_len); fewer rows when the texts run out (at least one, else CompressError).
    """
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=True)["input_ids"] + sep)
        if len(ids) >= seq_len * n_sequences:
            break
    n = min(n_sequences, len(ids) // seq_len)
    if n == 0:
        raise CompressError(f"the texts hold {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def encoder_batches(tokenizer, texts: list[str], max_length: int, batch_size: int):
    """Encoder batches: dicts of input_ids / attention_mask int64 (b, <= max_length), padded."""
    for i in range(0, len(texts), batch_size):
        yield tokenizer(texts[i : i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")


def calibration_batches(tokenizer, kind: str, texts: list[str], n: int, seq_len: int,
                        batch_size: int = 8, config=None) -> list[dict]:
    """Model inputs for calibration: ``n`` samples in batches of ``batch_size``.

    causal-lm: windows of ``seq_len`` tokens from the joined texts ({"input_ids": int64 (b, T),
    "use_cache": False}); encoders: the first ``n`` texts truncated to ``seq_len`` tokens
    (input_ids / attention_mask / token_type_ids as the tokenizer gives them). config: the model's
    transformers config; ``seq_len`` is cut to its context length (with a warning) when longer.
    """
    if tokenizer is None:
        raise CompressError(f"calibrating a {kind} model needs its tokenizer, and none was found")
    if config is not None:
        seq_len = cap_to_context(seq_len, config, "calibration windows")
    if kind == "causal-lm":
        ids = token_stream_batches(tokenizer, texts, seq_len, n)
        return [{"input_ids": ids[i : i + batch_size], "use_cache": False} for i in range(0, len(ids), batch_size)]
    return [dict(b) for b in encoder_batches(tokenizer, texts[:n], seq_len, batch_size)]


def read_labelled_file(path: str | Path, task: str = "classification") -> tuple[list[str], list]:
    """Texts and labels from a ``.jsonl`` (one ``{"text": ..., "label": ...}`` per line) or ``.csv``
    (header ``text,label``) file. Other or missing columns, an empty file, a single class
    (classification) or a non-numeric label (regression) raise a CompressError naming them.
    Labels are returned as written (JSON values; strings for CSV, floats for CSV regression).
    """
    path = Path(path)
    if task not in TASKS:
        raise CompressError(f"task must be one of {TASKS}, got {task!r}")
    if not path.is_file():
        raise CompressError(f"labels file {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict]] = []
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CompressError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(rec, dict):
                    raise CompressError(f"{path}:{lineno}: expected a JSON object with text and label")
                rows.append((lineno, rec))
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for rec in reader:
                if None in rec:
                    raise CompressError(f"{path}:{reader.line_num}: more fields than the header's "
                                        f"{len(reader.fieldnames)}")
                rows.append((reader.line_num, rec))
            header = reader.fieldnames or []
        _check_columns(path, "header", set(header))
    else:
        raise CompressError(f"labels file {path} must end in .jsonl or .csv, got {suffix or 'no suffix'!r}")
    if not rows:
        raise CompressError(f"labels file {path} has no rows")
    texts, labels = [], []
    for lineno, rec in rows:
        _check_columns(path, f"line {lineno}", set(rec))
        text, label = rec["text"], rec["label"]
        if not isinstance(text, str):
            raise CompressError(f"{path}:{lineno}: text must be a string, got {type(text).__name__}")
        if label is None or label == "" or isinstance(label, (list, dict)):
            raise CompressError(f"{path}:{lineno}: label must be a non-empty scalar, got {label!r}")
        if task == "regression":
            try:
                label = float(label)
            except ValueError:
                raise CompressError(f"{path}:{lineno}: regression label {label!r} is not a number") from None
        texts.append(text)
        labels.append(label)
    if task == "classification":
        kinds = {type(v).__name__ for v in labels}
        if len(kinds) > 1:
            raise CompressError(f"labels in {path} mix types ({', '.join(sorted(kinds))})")
        classes = set(labels)
        if len(classes) < 2:
            raise CompressError(f"labels file {path} has a single class {labels[0]!r}; "
                                f"classification needs at least 2")
    return texts, labels


def _check_columns(path: Path, where: str, cols: set) -> None:
    missing, unknown = {"text", "label"} - cols, cols - {"text", "label"}
    if missing or unknown:
        parts = ([f"missing {', '.join(sorted(missing))}"] if missing else []) + (
            [f"unknown {', '.join(sorted(map(str, unknown)))}"] if unknown else [])
        raise CompressError(f"labels file {path} ({where}): columns must be text,label; "
                            f"{'; '.join(parts)}")

