"""Peak memory and time of planning and applying, in memory vs streamed block by block, on the CPU.

Part 1 (issues 8 and 18): a random-weight 206 M-parameter Llama (hidden 1024, 16 layers, ffn 2816,
stories260K's 512-token vocabulary, untied head; 0.83 GB fp32: the issue's model, whose 824 MB
leave room for no larger vocabulary). Each run is a fresh process; its peak resident memory
is VmHWM. Runs: ``compress plan --method fisher --granularity module --budget 5`` in memory and
with ``--low-memory`` (the two plans must be identical), then ``compress apply`` of a uniform int4
g128 RTN plan in memory and with ``--low-memory`` (the two outputs must be bit-identical).

Part 2: a model larger than the memory it is given. A bigger random Llama (``--big-layers`` layers
of hidden 1536, ffn 4096: 1.69 GiB fp32 at 16 layers) is planned under a cgroup memory limit
(``--cap``, default 1.5 GiB; a child of this process's cgroup-v1 memory group, removed after):
in memory (fails: the weights alone exceed the cap) and streamed. Where no cgroup can be made,
the runs go uncapped and the table reports each peak against the model's size.

Calibration: the default corpus through stories260K's tokenizer, 32 windows of 128 tokens, the
planner's defaults otherwise. Needs the shared data (stories260K's tokenizer).

    python bench/lowmem.py [--big-layers 16] [--cap 1.5GiB] [--skip-big]
                                           # writes bench/results/lowmem-cpu.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from _common import cpu_name  # noqa: E402  (bench/ is the script's directory)

RESULTS = Path(__file__).parent / "results"
PLAN_ARGS = dict(method="fisher", granularity="module", budget=5.0)

CHILD = r"""
import json, sys, time
a = json.loads(sys.argv[1])
import compress
t = time.time()
try:
    if a["what"] == "plan":
        p = compress.plan(a["model"], progress=False, low_memory=a["low"], **a["plan_args"])
        p.save(a["out"])
        extra = {"metric": p.sensitivity["provenance"]["metric"],
                 "offloaded_bytes": p.sensitivity["provenance"].get("offloaded_bytes"),
                 "state_budget_bytes": p.sensitivity["provenance"].get("state_budget_bytes")}
    else:
        compress.apply(a["model"], a["plan"], a["out"], progress=False, low_memory=a["low"])
        extra = {}
    ok, err = True, ""
except MemoryError as exc:
    ok, err, extra = False, f"MemoryError {exc}", {}
except RuntimeError as exc:  # torch reports failed allocations as RuntimeError
    ok, err, extra = False, f"RuntimeError {str(exc)[:200]}", {}
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's peak.
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"ok": ok, "error": err, "peak_rss_bytes": peak, "seconds": time.time() - t, **extra}))
"""


def make_model(path: Path, hidden: int, layers: int, ffn: int, heads: int) -> int:
    """A random Llama saved to ``path`` with stories260K's tokenizer; returns its fp32 bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress.llama2c import stories260k_dir

    tok = AutoTokenizer.from_pretrained(stories260k_dir())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
                      max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, max_shard_size="500MB")
    tok.save_pretrained(path)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return nbytes


class Cap:
    """A child memory cgroup (v1) of this process's own, limited to ``nbytes``; None if unavailable."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.path = nbytes, None
        try:
            rel = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                       if "memory" in line.split(":", 2)[1].split(","))
            path = Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / f"compress-lowmem-{os.getpid()}"
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(nbytes))
            self.path = path
        except (StopIteration, OSError):
            self.path = None

    def prefix(self) -> list[str]:
        """A command prefix that moves the command into the cgroup before it starts."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "capped"]

    def max_usage(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def reset(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def remove(self) -> None:
        if self.path is not None:
            self.path.rmdir()


def child(args: dict, cap: Cap | None = None) -> dict:
    cmd = [sys.executable, "-c", CHILD, json.dumps(args)]
    if cap is not None and cap.path is not None:
        cap.reset()
        cmd = cap.prefix() + cmd
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        why = "killed by the kernel (out of memory under the cap)" if res.returncode in (-9, 137) else \
            (res.stderr.strip().splitlines() or ["no output"])[-1][:200]
        out = {"ok": False, "error": f"exit {res.returncode}: {why}", "peak_rss_bytes": None, "seconds": None}
    else:
        out = json.loads(lines[-1])
    if cap is not None and cap.path is not None:
        out["cgroup_max_usage_bytes"] = cap.max_usage()
    return out


def same_plan(a: Path, b: Path) -> bool | None:
    if not (a.exists() and b.exists()):
        return None
    la, lb = json.loads(a.read_text())["layers"], json.loads(b.read_text())["layers"]
    return la == lb


def same_weights(a: Path, b: Path) -> bool | None:
    import torch
    from safetensors.torch import load_file

    from compress.checkpoint import WEIGHTS

    if not ((a / WEIGHTS).exists() and (b / WEIGHTS).exists()):
        return None
    x, y = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def gib(n) -> str:
    return f"{n / 2**30:.2f}" if n else ""


def table(runs: dict, nbytes: int, capped: bool) -> list[str]:
    head = "| run | ok | peak RSS (GiB) | peak / fp32 model | seconds |" + (" cgroup peak (GiB) |" if capped else "") \
        + " states: memory budget / on disk (GiB) | error |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in runs.items():
        share = f"{r['peak_rss_bytes'] / nbytes:.2f}" if r.get("peak_rss_bytes") else ""
        secs = f"{r['seconds']:.0f}" if r.get("seconds") else ""
        disk = "" if r.get("offloaded_bytes") is None else \
            f"{gib(r.get('state_budget_bytes'))} / {gib(r['offloaded_bytes']) or '0'}"
        row = f"| {name} | {r['ok']} | {gib(r.get('peak_rss_bytes'))} | {share} | {secs} |"
        if capped:
            row += f" {gib(r.get('cgroup_max_usage_bytes'))} |"
        lines.append(row + f" {disk} | {r['error']} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-layers", type=int, default=16)
    ap.add_argument("--cap", default="1.5GiB", help="memory limit of part 2 (e.g. 1.5GiB)")
    ap.add_argument("--skip-big", action="store_true", help="part 1 only")
    ap.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON of the last run")
    args = ap.parse_args()
    if args.render:
        result = json.loads((RESULTS / "lowmem-cpu.json").read_text())
        print(render(result))
        return 0
    import compress
    from compress.planner import parse_bytes

    command = "python bench/lowmem.py " + " ".join(sys.argv[1:])
    result: dict = {"command": command, "cpu": cpu_name(), "date": str(date.today()), "cores": os.cpu_count(),
                    "plan_args": PLAN_ARGS}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        model = tmp / "llama206m"
        nbytes = make_model(model, 1024, 16, 2816, 16)
        common = {"model": str(model), "plan_args": PLAN_ARGS}
        runs = {"plan fisher, in memory": child({**common, "what": "plan", "low": False, "out": str(tmp / "p0.json")}),
                "plan fisher, streamed (--low-memory)": child({**common, "what": "plan", "low": True,
                                                               "out": str(tmp / "p1.json")})}
        rtn = tmp / "rtn.json"
        compress.plan(model, bits=4, group_size=128).save(rtn)
        runs["apply int4 RTN, in memory"] = child({**common, "what": "apply", "low": False, "plan": str(rtn),
                                                   "out": str(tmp / "a0")})
        runs["apply int4 RTN, block by block (--low-memory)"] = child({**common, "what": "apply", "low": True,
                                                                       "plan": str(rtn), "out": str(tmp / "a1")})
        result["part1"] = {"model_bytes": nbytes, "runs": runs,
                           "plans_identical": same_plan(tmp / "p0.json", tmp / "p1.json"),
                           "apply_bit_identical": same_weights(tmp / "a0", tmp / "a1")}
        for d in ("a0", "a1", "p0.json", "p1.json"):
            subprocess.run(["rm", "-rf", str(tmp / d)], check=False)
        subprocess.run(["rm", "-rf", str(model)], check=False)
        if not args.skip_big:
            big = tmp / "llama-big"
            big_bytes = make_model(big, 1536, args.big_layers, 4096, 12)
            cap = Cap(parse_bytes(args.cap))
            try:
                common = {"model": str(big), "plan_args": PLAN_ARGS}
                runs = {"plan fisher, in memory": child({**common, "what": "plan", "low": False,
                                                         "out": str(tmp / "b0.json")}, cap),
                        "plan fisher, streamed (--low-memory)": child({**common, "what": "plan", "low": True,
                                                                       "out": str(tmp / "b1.json")}, cap)}
            finally:
                cap.remove()
            result["part2"] = {"model_bytes": big_bytes, "layers": args.big_layers, "runs": runs,
                               "cap_bytes": cap.nbytes if cap.path is not None else None}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lowmem-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    return 0 if result["part1"]["plans_identical"] and result["part1"]["apply_bit_identical"] else 1


def render(result: dict) -> str:
    """Write (and return) bench/results/lowmem-cpu.md from a run's result."""
    command = result["command"]
    lines = [f"# Plan and apply: in memory vs streamed block by block ({result['date']})", "",
             f"CPU: {result['cpu']} ({result['cores']} cores, shared with other jobs); command: `{command}`; "
             f"plan: `compress plan MODEL --method fisher --granularity module --budget 5` (32 windows x 128 tokens "
             f"of the default corpus, metric {runs_metric(result)}); apply: uniform int4 g128 RTN. Peak RSS: the "
             "process's VmHWM.", "",
             f"## 206 M-parameter random Llama (hidden 1024, 16 layers, ffn 2816, vocabulary 512; "
             f"{result['part1']['model_bytes'] / 1e9:.3f} GB fp32)", ""]
    lines += table(result["part1"]["runs"], result["part1"]["model_bytes"], False)
    lines += ["", f"streamed plan identical to the in-memory plan: {result['part1']['plans_identical']}; "
                  f"block-by-block apply bit-identical to in-memory apply: {result['part1']['apply_bit_identical']}"]
    if "part2" in result:
        p2 = result["part2"]
        capped = p2["cap_bytes"] is not None
        lines += ["", f"## Larger than its memory: random Llama, {p2['layers']} layers of hidden 1536, ffn 4096 "
                      f"({p2['model_bytes'] / 2**30:.2f} GiB fp32)", "",
                  (f"Each run in a cgroup (v1) limited to {gib(p2['cap_bytes'])} GiB (page cache counts against it "
                   "but is reclaimed); 'cgroup peak' is its memory.max_usage_in_bytes." if capped else
                   "No cgroup could be made here: the runs are uncapped; compare each peak with the model's size."), ""]
        lines += table(p2["runs"], p2["model_bytes"], capped)
    md = "\n".join(lines) + "\n"
    (RESULTS / "lowmem-cpu.md").write_text(md)
    return md


def runs_metric(result: dict) -> str:
    for r in result["part1"]["runs"].values():
        if r.get("metric"):
            return r["metric"]
    return "?"


if __name__ == "__main__":
    sys.exit(main())
