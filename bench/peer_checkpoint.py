"""An llm-compressor checkpoint of stories260K, read by compress and by transformers: same figures?

For each layout below, llm-compressor's GPTQ (actorder static, damp 0.01, peers.py's 128 sampled
calibration sequences) writes a compressed-tensors checkpoint in its own venv (PEERS_PYTHON, see
bench/peers.py). Then, per checkpoint:

  compress     ``compress inspect CKPT --json`` and ``compress eval CKPT --reference stories260k
               --json`` (the CLI, main venv): perplexity and mean KL(fp32 ‖ quantized) on compress
               eval's default windows (64 × 256 tokens of the embedded corpus);
  transformers ``AutoModelForCausalLM.from_pretrained(CKPT)`` in the main venv and in the peers' venv
               (another transformers / compressed-tensors pair), evaluated by the same code on the
               same windows (compress.evaluate.lm_metrics against compress.models.load_model's fp32
               stories260K of that venv); its logits are compared with compress.load's.

Each layout is made twice: with llm-compressor's default scales (the model's dtype, float32 here)
and with its scale_dtype float16. compress writes float16 scales; a peer's float32 scales that
float16 cannot hold are kept float32 on load (with a warning); every quantized layer's weight as
compress.load dequantizes it is compared with the checkpoint's own (q − z)·scale in float32
(peers.py's file reader).

Layouts (K = 172 for down_proj, where llm-compressor refuses group 32):
  mixed-asym        down_proj int8 per channel, every other linear int4 g32 asymmetric (peers.py "mixed")
  mixed-sym         down_proj int8 per channel, every other linear int4 g32 symmetric
  int4-channel-asym every linear int4 per channel asymmetric (a single scheme)

    python bench/peer_checkpoint.py [--layouts mixed-asym,mixed-sym,int4-channel-asym] [--scales float32,float16]

Writes bench/results/peer-checkpoint-cpu.{json,md} (``render`` rewrites the .md from the .json).
``python bench/peer_checkpoint.py hf-eval JOB`` is the transformers side, run by this script under
either venv's interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
import warnings
from datetime import date
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
LAYOUTS = {
    "mixed-asym": "down_proj int8 channel, other linears int4 g32 asymmetric",
    "mixed-sym": "down_proj int8 channel, other linears int4 g32 symmetric",
    "int4-channel-asym": "every linear int4 per channel asymmetric (one scheme)",
}
SEQ_LEN, WINDOWS = 256, 64  # compress eval's defaults for a causal LM


def _env() -> dict:
    # One thread per job (a shared 2-core machine), as bench/peers.py.
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# ---------------------------------------------------------------- transformers side (either venv)

def hf_eval(job_file: str) -> int:
    """Load job["ckpt"] with transformers, evaluate it with compress's lm_metrics on job["ids"]
    (int64 (n, T)) against job["reference"], save its float32 logits (n, T, V) to job["logits"]
    and the figures to job["result"]. A refused load is recorded, not raised."""
    # bench/ holds kernels.py, which would shadow the `kernels` package transformers probes for.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    sys.path.insert(0, str(REPO))  # compress's source (the peers' venv has its dependencies)
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from compress.data import load_texts, token_stream_batches
    from compress.evaluate import causal_logits, lm_metrics
    from compress.models import load_model, load_tokenizer

    torch.set_num_threads(1)
    job = json.loads(Path(job_file).read_text())
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    try:
        import compressed_tensors

        versions["compressed_tensors"] = compressed_tensors.__version__
    except ImportError:
        versions["compressed_tensors"] = None
    out = {"versions": versions, "python": sys.executable}
    try:
        model = AutoModelForCausalLM.from_pretrained(job["ckpt"]).eval()
    except Exception as exc:  # noqa: BLE001  (any refusal is a result to record)
        out["error"] = f"{type(exc).__name__}: {_last_line(str(exc))}"
        Path(job["result"]).write_text(json.dumps(out, indent=1))
        return 0
    ids = load_file(job["ids"])["ids"]
    # The windows this venv's tokenizer makes from the same texts (a tokenizer difference would
    # change the windows, not the models; the figures use the given ids either way).
    own = token_stream_batches(load_tokenizer(Path(job["ckpt"])), load_texts(None), ids.shape[1], ids.shape[0])
    ref = load_model(job["reference"])
    out["model_dtype"] = str(next(model.parameters()).dtype)
    out["quantized_modules"] = sorted({type(m).__name__ for m in model.modules()
                                       if hasattr(m, "quantization_scheme")})
    out["same_windows_from_own_tokenizer"] = bool(torch.equal(own, ids))
    out["metrics"] = lm_metrics(model, ids, ref.model)
    save_file({"logits": torch.cat(list(causal_logits(model, ids))).contiguous()}, job["logits"])
    Path(job["result"]).write_text(json.dumps(out, indent=1))
    return 0


# ---------------------------------------------------------------- main venv: build, compress CLI, compare

def make_layout(model, name: str) -> dict:
    """name -> QuantSpec of every quantized linear for one of LAYOUTS."""
    from compress.quant import QuantSpec

    mixed = model.layout("mixed")
    if name == "mixed-asym":
        return mixed
    if name == "mixed-sym":
        return {n: QuantSpec(4, s.group_size, True) if s.bits == 4 else s for n, s in mixed.items()}
    if name == "int4-channel-asym":
        return {n: QuantSpec(4, -1, False) for n in mixed}
    raise SystemExit(f"unknown layout {name!r} (one of {', '.join(LAYOUTS)})")


def cli(args: list[str], log: Path) -> tuple[int, str]:
    """Run the compress CLI of this interpreter's venv; (exit code, combined output)."""
    exe = Path(sys.executable).parent / "compress"
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=_env())
    text = proc.stdout + proc.stderr
    log.write_text(text)
    return proc.returncode, text


def run_hf(python: str, ckpt: Path, reference: Path, ids_file: Path, work: Path, tag: str) -> dict:
    """The transformers side under ``python``; its result dict plus the logits path."""
    job = {"ckpt": str(ckpt), "reference": str(reference), "ids": str(ids_file),
           "logits": str(work / f"{tag}.logits.safetensors"), "result": str(work / f"{tag}.result.json")}
    (work / f"{tag}.job.json").write_text(json.dumps(job))
    proc = subprocess.run([python, str(Path(__file__).resolve()), "hf-eval", str(work / f"{tag}.job.json")],
                          capture_output=True, text=True, env=_env(), cwd=str(work))
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {_last_line(proc.stderr)}"}
    res = json.loads(Path(job["result"]).read_text())
    # transformers prints why it refused in its load report, before the exception
    mismatch = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "size mismatch" in ln]
    if "error" in res and mismatch:
        key, _, why = (c.strip() for c in mismatch[0].split("|"))
        res["error"] += f" ({len(mismatch)} rows of MISMATCH, e.g. {key}: {why.replace('Reinit due to ', '')})"
    res["logits_file"] = job["logits"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "hf-eval", "render"],
                    help="bench (default); hf-eval JOB: the transformers side; render: rewrite the .md from the .json")
    ap.add_argument("job", nargs="?", help="hf-eval: the job file")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--scales", default="float32,float16",
                    help="llm-compressor's scale dtypes to make checkpoints with (float32: its default here)")
    ap.add_argument("--keep", help="keep the checkpoints in this directory (default: a temporary one)")
    args = ap.parse_args()
    if args.mode == "hf-eval":
        return hf_eval(args.job)
    if args.mode == "render":
        print(render(json.loads((RESULTS / "peer-checkpoint-cpu.json").read_text())))
        return 0
    return bench(args)


def bench(args) -> int:
    sys.path.insert(0, str(BENCH))
    import torch
    from safetensors.torch import load_file, save_file

    import compress
    from compress.data import load_texts, token_stream_batches
    from compress.evaluate import causal_logits
    from compress.models import load_tokenizer
    from compress.qlinear import QuantLinear
    from peers import DAMP, Model, find_checkpoint, peer_groups, peer_python, read_peer_weights, run_peer

    from _common import cpu_name

    torch.set_num_threads(1)
    t0 = time.time()
    import compressed_tensors
    import transformers

    main_versions = {"transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "torch": torch.__version__}
    rows, checkpoints = [], []
    model = Model("stories", quick=True)  # stories260K, its calibration sequences (peers.py's)
    command = "python bench/peer_checkpoint.py " + " ".join(sys.argv[1:])
    header = (f"llm-compressor checkpoints of stories260K read by compress and by transformers, {date.today()}, "
              f"CPU: {cpu_name()} ({os.cpu_count()} cores, shared; 1 thread per job), command: {command.rstrip()}; "
              f"windows: compress eval's default ({WINDOWS} x {SEQ_LEN} tokens of the embedded corpus)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        calib = work / "stories-calib.json"
        calib.write_text(json.dumps(model.rows()))
        for name, scales in [(n, s) for n in args.layouts.split(",") for s in args.scales.split(",")]:
            layout = make_layout(model, name)
            # peer_groups reads the layout through model.layout(kind): hand it this one.
            groups, ignore = peer_groups(types.SimpleNamespace(layout=lambda _k: layout, lm=model.lm), name)
            if scales == "float16":  # llm-compressor's scale_dtype option (default: the model's, float32)
                groups = [dict(g, scale_dtype="float16") for g in groups]
            name = f"{name}/{scales}"
            tag = name.replace("/", "-")
            out = work / f"llmc-{tag}"
            job = {"method": "gptq", "actorder": "static", "model": str(model.path), "kind": model.lm.kind,
                   "calib": str(calib), "out": str(out), "groups": groups, "ignore": ignore, "damp": DAMP,
                   "seq_len": model.seq_len}
            secs = run_peer(job, work, out.name)
            ckpt = find_checkpoint(out)
            qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
            info = {"layout": name, "description": LAYOUTS[name.split("/")[0]], "llmc_seconds": round(secs, 1),
                    "config_groups": {g: {k: v.get(k) for k in ("num_bits", "strategy", "group_size", "symmetric")}
                                      for g, v in ((g, c["weights"]) for g, c in qc["config_groups"].items())},
                    "format": qc.get("format")}
            # compress inspect (CLI)
            rc, text = cli(["inspect", str(ckpt), "--json", str(work / f"{tag}.inspect.json")],
                           work / f"{tag}.inspect.log")
            if rc == 0:
                ins = json.loads((work / f"{tag}.inspect.json").read_text())
                info["inspect"] = {"layers": len(ins["layers"]), "by_bits": ins["totals"]["quantized_by_bits"],
                                   "file_bytes": ins["totals"]["file_bytes"]}
            else:
                info["inspect"] = {"error": f"exit {rc}: {_last_line(text)}"}
            # compress eval (CLI)
            rc, text = cli(["eval", str(ckpt), "--reference", "stories260k", "--samples", str(WINDOWS),
                            "--seq-len", str(SEQ_LEN), "--json", str(work / f"{tag}.eval.json")],
                           work / f"{tag}.eval.log")
            if rc != 0:
                info["eval_error"] = f"exit {rc}: {_last_line(text)}"
                checkpoints.append(info)
                rows.append({"layout": name, "loader": "compress eval (CLI)", "note": info["eval_error"]})
                continue
            q = json.loads((work / f"{tag}.eval.json").read_text())["quality"]
            # the windows compress eval evaluated, and compress.load's logits on them
            ids = token_stream_batches(load_tokenizer(ckpt), load_texts(None), SEQ_LEN, WINDOWS)
            ids_file = work / f"{tag}.ids.safetensors"
            save_file({"ids": ids}, ids_file)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                lm = compress.load(ckpt)
            info["load_warnings"] = [str(w.message) for w in caught if "weight_scale of" in str(w.message)]
            ours = torch.cat(list(causal_logits(lm.model, ids)))
            # compress's dequantized weights vs the checkpoint's own float32 (q - z) * scale
            theirs_w = read_peer_weights(ckpt)
            wdiff, wrel = 0.0, 0.0
            for lname, m in lm.model.named_modules():
                if isinstance(m, QuantLinear):
                    d = (m.dequantized_weight(torch.float32) - theirs_w[lname]).abs().max().item()
                    wdiff = max(wdiff, d)
                    wrel = max(wrel, d / theirs_w[lname].abs().max().item())
            info["quantized_layers_loaded"] = sum(isinstance(m, QuantLinear) for m in lm.model.modules())
            info["max_abs_weight_diff_vs_fp32_scales"] = wdiff
            info["max_rel_weight_diff_vs_fp32_scales"] = wrel
            info["checkpoint_scale_dtype"] = str(next(iter(
                t.dtype for k, t in load_file(next(ckpt.glob("*.safetensors"))).items() if k.endswith("weight_scale"))))
            checkpoints.append(info)
            base = {"layout": name, "bits": round(model.bits(layout), 3)}
            rows.append({**base, "loader": f"compress eval (CLI; transformers {main_versions['transformers']})",
                         "perplexity": q["perplexity"], "mean_kl": q["mean_kl"],
                         "reference_perplexity": q["reference_perplexity"], "tokens": q["tokens"],
                         "note": f"{info['quantized_layers_loaded']} quantized layers; weights vs the checkpoint's "
                                 f"(q-z)*scale: max abs diff {wdiff:.2e}"
                                 f"{'; warned: float32 scales kept' if info['load_warnings'] else ''}"})
            print(rows[-1], flush=True)
            for venv, python in (("main", sys.executable), ("llmc", peer_python())):
                res = run_hf(python, ckpt, model.path, ids_file, work, f"{tag}-{venv}")
                v = res.get("versions", {})
                label = (f"transformers {v.get('transformers')} + CT {v.get('compressed_tensors')} "
                         f"({venv} venv)") if v else f"transformers ({venv} venv)"
                if "error" in res:
                    rows.append({**base, "loader": label, "note": f"load refused: {res['error']}"})
                    print(rows[-1], flush=True)
                    continue
                m = res["metrics"]
                theirs = load_file(res["logits_file"])["logits"]
                rows.append({**base, "loader": label, "perplexity": m["perplexity"], "mean_kl": m["mean_kl"],
                             "reference_perplexity": m["reference_perplexity"], "tokens": m["tokens"],
                             "d_perplexity": m["perplexity"] - q["perplexity"], "d_mean_kl": m["mean_kl"] - q["mean_kl"],
                             "d_reference_perplexity": m["reference_perplexity"] - q["reference_perplexity"],
                             "max_abs_logit_diff": (theirs - ours).abs().max().item(),
                             "note": (f"{res['model_dtype']}; modules {','.join(res['quantized_modules']) or 'none'}"
                                      f"{'' if res['same_windows_from_own_tokenizer'] else '; its tokenizer makes other windows'}")})
                print(rows[-1], flush=True)
    out = {"header": header, "command": command, "date": str(date.today()), "cpu": cpu_name(),
           "platform": platform.platform(), "seconds": round(time.time() - t0, 1),
           "main_venv": main_versions, "peers_python": peer_python(), "checkpoints": checkpoints, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peer-checkpoint-cpu.json").write_text(json.dumps(out, indent=1) + "\n")
    print(render(out))
    return 0


NOTES = """
Reading: "float16" checkpoints were made with llm-compressor's scale_dtype float16 (scales rounded to
float16 values, stored in the model's float32); "float32" ones with its default scales, which compress
keeps in float32 on load (it warns: those layers skip the GPU kernels); the rows' d_* columns and max_abs_logit_diff
are transformers' figures minus compress eval's, on the same windows, by the same code (lm_metrics).
A refused load is transformers' own error (its load report's MISMATCH rows): transformers 5.24 with
compressed-tensors 0.20 lays asymmetric modules out with unpacked zero points and refuses the packed ones.
"""


def render(out: dict) -> str:
    """Write bench/results/peer-checkpoint-cpu.md from the results dict (the JSON); returns the text."""
    sys.path.insert(0, str(BENCH))
    from _common import markdown_table

    cols = ["layout", "bits", "loader", "perplexity", "mean_kl", "reference_perplexity", "d_perplexity", "d_mean_kl",
            "max_abs_logit_diff", "note"]
    md = markdown_table(out["rows"], cols, out["header"])
    md += "\nCheckpoints (llm-compressor GPTQ, actorder static, damp 0.01; max weight diff: compress.load's " \
          "dequantized weights vs the checkpoint's own (q - z) * scale in float32):\n\n"
    md += markdown_table(
        [{"layout": c["layout"], "groups": "; ".join(f"int{g['num_bits']} {g['strategy']} {g['group_size'] or ''} "
                                                     f"{'sym' if g['symmetric'] else 'asym'}"
                                                     for g in c["config_groups"].values()),
          "inspect": (f"{c['inspect']['layers']} layers, by bits {c['inspect']['by_bits']}" if "layers" in c["inspect"]
                      else c["inspect"]["error"]),
          "stored scale dtype": c.get("checkpoint_scale_dtype"),
          "max_abs_weight_diff": c.get("max_abs_weight_diff_vs_fp32_scales"),
          "max_rel_weight_diff": c.get("max_rel_weight_diff_vs_fp32_scales")} for c in out["checkpoints"]],
        ["layout", "groups", "inspect", "stored scale dtype", "max_abs_weight_diff", "max_rel_weight_diff"])
    md += NOTES
    (RESULTS / "peer-checkpoint-cpu.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
