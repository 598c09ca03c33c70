"""Peak memory of block-by-block apply vs loading the whole model (issue 8), on the CPU.

Builds a random-weight Llama-style model of about 1.6 GiB (fp32) on disk, then applies a uniform
int4 g128 plan twice, each in a fresh process: the whole model loaded, and block by block with
``--low-memory``. Reports each process's peak resident memory (VmHWM) against the model's size and
checks that the two compressed models are bit-identical.

A hard cap was tried first (RLIMIT_DATA in the child): it cannot serve, because it limits virtual
data mappings, and torch plus transformers reserve about 1.2 GB of those before any weight is read.
A cgroup memory limit would be the right cap; this machine gives none, so the peak is reported.

    python bench/lowmem.py [--layers 12]     # writes bench/results/lowmem-cpu.{json,md}
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from _common import cpu_name  # noqa: E402  (bench/ is the script's directory)

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, sys, time
model, plan, out, low = sys.argv[1:5]
import compress
t = time.time()
try:
    compress.apply(model, plan, out, progress=False, low_memory=low == "1")
    ok, err = True, ""
except MemoryError as exc:
    ok, err = False, f"MemoryError {exc}"
except RuntimeError as exc:  # torch reports failed allocations as RuntimeError
    ok, err = False, f"RuntimeError {str(exc)[:200]}"
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's peak.
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"ok": ok, "error": err, "peak_rss_bytes": peak, "seconds": time.time() - t}))
"""


def make_model(path: Path, layers: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=layers,
                      num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, max_shard_size="500MB")
    vocab = {f"t{i}": i for i in range(32000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", bos_token="t2").save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child(model: Path, plan: Path, out: Path, low: bool) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(model), str(plan), str(out), "1" if low else "0"],
                         capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": (res.stderr.strip().splitlines() or ["no output"])[-1][:200],
                "peak_rss_bytes": None, "seconds": None}
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    import torch

    import compress
    from compress.checkpoint import WEIGHTS
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "llama"
        nbytes = make_model(model, args.layers)
        plan = tmp / "plan.json"
        compress.plan(model, bits=4, group_size=128).save(plan)
        runs = {
            "whole model": child(model, plan, tmp / "full", False),
            "block by block (--low-memory)": child(model, plan, tmp / "low", True),
        }
        identical = None
        if (tmp / "full").exists() and (tmp / "low").exists():
            a, b = load_file(tmp / "full" / WEIGHTS), load_file(tmp / "low" / WEIGHTS)
            identical = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
            compressed = (tmp / "low" / WEIGHTS).stat().st_size
        else:
            compressed = None
    cpu = cpu_name()
    header = (f"Block-by-block apply under a memory cap, {date.today()}, CPU: {cpu}; model: random Llama, "
              f"{args.layers} layers, hidden 1536, {nbytes / 2**30:.2f} GiB fp32; plan: uniform int4 g128 RTN; "
              f"command: python bench/lowmem.py --layers {args.layers}")
    lines = [header, "", "| run | ok | peak RSS (GiB) | peak / model size | seconds | error |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        peak = f"{r['peak_rss_bytes'] / 2**30:.2f}" if r["peak_rss_bytes"] else ""
        share = f"{r['peak_rss_bytes'] / nbytes:.2f}" if r["peak_rss_bytes"] else ""
        secs = f"{r['seconds']:.0f}" if r["seconds"] else ""
        lines.append(f"| {name} | {r['ok']} | {peak} | {share} | {secs} | {r['error']} |")
    lines.append("")
    lines.append(f"compressed weights: {compressed / 2**30:.3f} GiB; block-by-block output bit-identical to "
                 f"whole-model output: {identical}" if compressed else "no comparison (a run failed)")
    md = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lowmem-cpu.json").write_text(json.dumps({"header": header, "runs": runs, "identical": identical,
                                                         "model_bytes": nbytes, "compressed_bytes": compressed},
                                                        indent=1) + "\n")
    (RESULTS / "lowmem-cpu.md").write_text(md)
    print(md)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
