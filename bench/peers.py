"""compress vs llm-compressor (GPTQ, AWQ) vs AutoRound: same calibration, same evaluation, one run.

The peers run in a virtual environment of their own (they pin other transformers versions):

    python3 -m venv /work/bench-venvs/llmc && /work/bench-venvs/llmc/bin/pip install torch==2.13.0 \
        && /work/bench-venvs/llmc/bin/pip install 'llmcompressor==0.14.*' 'auto-round>=0.15'   # = extra peers-llmc

(``PEERS_PYTHON`` names its interpreter), each as a subprocess (bench/_peer_run.py) that writes its
checkpoint; this process never imports them. It reads their checkpoints as files (pack-quantized
int32 codes, scales, zero points; AutoRound's "fake" format holds dequantized floats, since its
compressed-tensors export fails on asymmetric zero points), loads their dequantized weights into
the fp32 model and evaluates every method the same way; compress's own results are dequantized
into the same fp32 model. Every job runs on one thread (a shared 2-core machine).

MiniLM: 1 − mean cosine of mean-pooled embeddings vs fp32 over 512 WikiText-2 test lines without
headings (128 tokens); calibration: the 128 lines from index 1000, truncated to 128 tokens, one
text per sample. stories260K: mean KL(fp32 ‖ quantized) over 64 sequences of 256 tokens sampled from
the fp32 model (seed 0), calibration 128 sampled sequences (seed 1), as bench/quality.py.
"on_calib": the same metric on the calibration texts (stories260K: the first 64 calibration
sequences), the error the quantizer's own fit sees.
Layouts: uniform int4 g32 / g128 asymmetric, and the equal-bytes mixed layout (every FFN down
projection int8 per channel, every other linear int4 g32 asymmetric); "plan<B>" is compress's
planner at B average bits per linear weight (fisher, module granularity, priced for GPTQ, target
any, on the same calibration texts; planning time included in the row's seconds; --plan-method,
--plan-samples and --plan-quantizer change the analyzer and the quantizer it prices). damp 0.01
(--damp / --peer-damp change compress's / the peers'). compress variants: "refitN" = N rounds of
least-squares scales (compress.refit; the CLI's default is 1 round, the variants without "refit"
are 0); "tokendamp1" = each layer damped at least K / n (compress.gptq.layer_damp; the CLI's default,
the variants without it use damp alone).

    python bench/peers.py [--quick] [--models stories,minilm] [--layouts g32,g128,mixed,plan4.7]
                          [--peers "llm-compressor gptq,awq,autoround"] [--compress LABEL,...]
    python bench/peers.py layers     # GPTQ layer by layer on the same H: compress vs llm-compressor
    python bench/peers.py noise      # spread of equivalent runs (block sizes, scale dtype), MiniLM g32

Writes bench/results/peers-cpu.{json,md} (layers / noise: peers-layers-cpu, peers-noise-cpu).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.data import calibration_batches, load_texts, shared_data_dir
from compress.evaluate import embedding_fidelity, lm_metrics, pooled_embeddings, sample_sequences
from compress.gptq import collect_hessians, fp_target_weight, gptq_quantize, layer_damp, token_mask
from compress.models import load_model, quantizable_linears, resolve_model_path
from compress.gptq import _gptq  # the clip search without gptq_quantize's per-layer pick (layers mode)
from compress.mse import DEFAULT_GRID, mse_quantize
from compress.quant import QuantSpec, dequantize, quantize, stored_bytes
from compress.walker import walk_blocks

from _common import cpu_name, markdown_table  # noqa: E402  (bench/ is the script's directory)

RESULTS = Path(__file__).parent / "results"
RUNNER = Path(__file__).parent / "_peer_run.py"
DEFAULT_PEER_PYTHON = "/work/bench-venvs/llmc/bin/python"
DAMP = 0.01


# ---------------------------------------------------------------- models, data, layouts

class Model:
    """One benchmark model: fp32 reference, calibration batches (ids shared with the peers), metric."""

    def __init__(self, name: str, quick: bool):
        data = shared_data_dir()
        if data is None:
            raise SystemExit("needs ../shared/data (or COMPRESS_DATA)")
        self.name = name
        if name == "minilm":
            self.path = resolve_model_path("minilm")
            self.lm = load_model(self.path)
            lines = [t for t in load_texts(data / "text" / "wikitext2-test.txt") if not t.startswith("=")]
            self.eval_texts = lines[: 64 if quick else 512]
            # One text per sample: no padding anywhere, for compress and the peers alike.
            self.batches = calibration_batches(self.lm.tokenizer, self.lm.kind, lines[1000:1128], 128, 128,
                                               batch_size=1)
            self.calib_texts = lines[1000:1128]
            self.seq_len = 128
            self.ref = pooled_embeddings(self.lm.model, self.lm.tokenizer, self.eval_texts)
            self.calib_ref = pooled_embeddings(self.lm.model, self.lm.tokenizer, self.calib_texts)
        else:
            from compress.llama2c import stories260k_dir

            self.path = stories260k_dir()
            self.lm = load_model(self.path)
            torch.manual_seed(0)
            self.eval_ids = sample_sequences(self.lm.model, 8 if quick else 64, 256, seed=0)
            calib = sample_sequences(self.lm.model, 128, 256, seed=1)
            self.calib_ids = calib[:64]  # the calibration metric's sequences (as many as the evaluation's)
            self.batches = [{"input_ids": calib[i : i + 8], "use_cache": False} for i in range(0, 128, 8)]
            self.calib_texts = self.lm.tokenizer.batch_decode(calib, skip_special_tokens=True)
            self.seq_len = 256
        self.linears = quantizable_linears(self.lm.model)
        # Real (unpadded) calibration tokens: what GPTQ's Hessians and token damping see.
        self.calib_tokens = sum(int(m.sum()) if (m := token_mask(b)) is not None else b["input_ids"].numel()
                                for b in self.batches)
        self.planned: dict[str, dict[str, QuantSpec]] = {}

    def plan(self, kind: str, work: Path, quantizer: dict | str = "gptq", method: str = "fisher",
             samples: int | None = None) -> float:
        """Layout ``kind`` = "plan<avg bits>" from compress's planner (fisher, module granularity,
        priced for act-order GPTQ, target any) on the calibration texts; returns its seconds."""
        from compress.api import plan

        data = work / f"{self.name}-calib.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in self.calib_texts))
        t = time.time()
        p = plan(self.path, method=method, granularity="module", budget=float(kind[4:]), quantizer=quantizer,
                 target="any", data=data, samples=samples, progress=False)
        self.planned[kind] = {n: lp.spec() for n, lp in p.layers.items() if n in self.linears}
        return time.time() - t

    def rows(self) -> list[dict]:
        """The calibration samples as JSON rows, one per sequence (what the peers get)."""
        out = []
        for b in self.batches:
            tensors = {k: v for k, v in b.items() if torch.is_tensor(v)}
            for i in range(next(iter(tensors.values())).shape[0]):
                mask = tensors.get("attention_mask")
                keep = mask[i].bool() if mask is not None else slice(None)
                out.append({k: v[i][keep].tolist() for k, v in tensors.items()})
        return out

    def metric(self, weights: dict[str, torch.Tensor]) -> dict:
        """Evaluate the fp32 model with ``weights`` (name -> (N, K) float32) put in place; also the
        same metric on the calibration texts (``on_calib``: how much of the error the quantizer's
        fit to its own calibration hides)."""
        model = copy.deepcopy(self.lm.model)
        for name, w in weights.items():
            model.get_submodule(name).weight.data.copy_(w)
        if self.name == "minilm":
            emb = pooled_embeddings(model, self.lm.tokenizer, self.eval_texts)
            calib = pooled_embeddings(model, self.lm.tokenizer, self.calib_texts)
            return {"one_minus_cosine": embedding_fidelity(self.ref, emb)["one_minus_cosine"],
                    "on_calib": embedding_fidelity(self.calib_ref, calib)["one_minus_cosine"]}
        m = lm_metrics(model, self.eval_ids, self.lm.model)
        return {"mean_kl": m["mean_kl"], "perplexity": m["perplexity"],
                "on_calib": lm_metrics(model, self.calib_ids, self.lm.model)["mean_kl"]}

    def is_down(self, name: str) -> bool:
        """The FFN's down projection (input = the FFN's hidden width)."""
        return name.endswith("mlp.down_proj") or name.endswith(".output.dense") and ".attention." not in name

    def layout(self, kind: str) -> dict[str, QuantSpec]:
        """name -> spec: "g32" / "g128" uniform int4 asymmetric, or "mixed" (down int8, others g32).

        A group at least as wide as a layer's row is one group per row (-1), as compress's planner
        stores it (stories260K's K = 64 at g128).
        """
        def int4(g: int, k: int) -> QuantSpec:
            return QuantSpec(4, -1 if g >= k else g, False)

        if kind in self.planned:
            return self.planned[kind]
        if kind == "mixed":
            return {n: QuantSpec(8) if self.is_down(n) else int4(32, m.in_features) for n, m in self.linears.items()}
        return {n: int4(int(kind[1:]), m.in_features) for n, m in self.linears.items()}

    def peer_refuses(self, kind: str) -> str | None:
        """Why llm-compressor cannot run this layout (a group that does not divide K), or None."""
        for n, spec in self.layout(kind).items():
            k = self.linears[n].in_features
            if spec.bits == 4 and spec.group_size != -1 and k % spec.group_size:
                return f"K = {k} is not a multiple of group {spec.group_size} ({n.rsplit('.', 1)[-1]})"
        return None

    def bits(self, layout: dict[str, QuantSpec], left_fp: tuple[str, ...] = ()) -> float:
        """Average stored bits per weight of the layout's linears (scales and zeros included),
        compress's format; layers in ``left_fp`` (a peer left them unquantized) count as 16 bits."""
        total = sum(stored_bytes(QuantSpec(16) if n in left_fp else spec, m.out_features, m.in_features)
                    for n, spec, m in ((n, layout[n], self.linears[n]) for n in layout))
        return 8 * total / sum(self.linears[n].weight.numel() for n in layout)


# ---------------------------------------------------------------- compress

def compress_weights(model: Model, layout: dict[str, QuantSpec], method: str = "gptq", act_order: bool = False,
                     static_groups: bool | None = None, mse: bool = False, masks: bool = True,
                     hessians: dict | None = None, block_size: int = 128,
                     true_sequential: bool = False, refit: int = 0, fp_target: float = 0.0,
                     damp: float = DAMP, token_damp: float = 0.0) -> dict[str, torch.Tensor]:
    """Quantize block by block through compress's walker; returns name -> dequantized (N, K) float32.

    Each block's layers get their Hessians from the block's inputs as the already-quantized blocks
    produce them (as ``compress.apply`` does), on real tokens only when ``masks``. true_sequential:
    within a block too, layers that share an input (q/k/v, gate/up) are quantized together, in the
    order of the forward pass, each group's H taken with the block's earlier layers quantized
    (the GPTQ reference's ``--true-sequential``; one block pass per group). fp_target: GPTQ aims that
    far towards the full-precision model's layer outputs (compress.gptq.fp_target_weight), with the
    drift from the walker's full-precision stream, as ``compress apply`` does. damp: GPTQ's (and
    fp-target's) ridge, a fraction of mean(diag H); the peers always get DAMP. token_damp: each
    layer gets at least token_damp · K / n of it (compress.gptq.layer_damp, as ``compress apply``).
    """
    lm = load_model(model.path)
    out: dict[str, torch.Tensor] = {}
    if method == "rtn":  # no calibration: each layer on its own
        for n, spec in layout.items():
            w = lm.model.get_submodule(n).weight.data
            out[n] = dequantize(mse_quantize(w, spec, name=n) if mse else quantize(w, spec, n))
        return out
    batch_masks = [token_mask(b) if masks else None for b in model.batches]

    def run(index: int, prefix: str, block: torch.nn.Module, inputs, reference=None) -> None:
        local = {n[len(prefix):]: spec for n, spec in layout.items() if n.startswith(prefix)}
        if not local:
            return
        groups = input_groups(block, local, inputs[0]) if true_sequential and method == "gptq" else [list(local)]
        for group in groups:
            quantize_group(prefix, block, inputs, {n: local[n] for n in group}, reference)

    def quantize_group(prefix: str, block: torch.nn.Module, inputs, local: dict[str, QuantSpec], reference) -> None:
        accs = {}
        if method == "gptq":
            accs = collect_hessians(block, {n: block.get_submodule(n) for n in local}, inputs, batch_masks, prefix,
                                    reference=reference)
            if hessians is not None:  # diagnostics: the H each layer was quantized with
                hessians.update({prefix + n: acc.hessian.clone() for n, acc in accs.items()})
        for n, spec in local.items():
            layer = block.get_submodule(n)
            if method == "gptq":
                target = layer.weight.data
                d = layer_damp(damp, token_damp, target.shape[1], accs[n].n_samples)
                if fp_target:
                    target = fp_target_weight(target, accs[n].hessian, accs[n].drift, fp_target, d, prefix + n)
                qw = gptq_quantize(target, accs[n].hessian, spec, damp=d, act_order=act_order,
                                   static_groups=static_groups, mse=mse, block_size=block_size, name=prefix + n,
                                   refit=refit)
            elif mse:
                qw = mse_quantize(layer.weight.data, spec, name=prefix + n)
            else:
                qw = quantize(layer.weight.data, spec, prefix + n)
            layer.weight.data = dequantize(qw)  # the next block sees this block quantized
            out[prefix + n] = layer.weight.data.clone()

    walk_blocks(lm.model, model.batches, run, device="cpu", progress=False, reference=fp_target > 0)
    return out


@torch.no_grad()
def input_groups(block: torch.nn.Module, names, first_input: tuple[tuple, dict]) -> list[list[str]]:
    """The block's layers ``names`` grouped by the input tensor they read, in forward order (one pass)."""
    seen: list[tuple[torch.Tensor, list[str]]] = []  # tensors kept alive, so identity is meaningful

    def hook_for(name):
        def hook(_module, args):
            for x, group in seen:
                if x is args[0]:
                    group.append(name)
                    return
            seen.append((args[0], [name]))
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        args, kwargs = first_input
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [group for _, group in seen]


# ---------------------------------------------------------------- peers: subprocess + checkpoint reader

def peer_python() -> str:
    return os.environ.get("PEERS_PYTHON", DEFAULT_PEER_PYTHON)


def run_peer(job: dict, work: Path, log_name: str) -> float:
    """Run bench/_peer_run.py on ``job`` in the peers' venv; returns its wall seconds."""
    job_file = work / f"{log_name}.job.json"
    job_file.write_text(json.dumps(job))
    t = time.time()
    with open(work / f"{log_name}.log", "w") as log:
        rc = subprocess.run([peer_python(), str(RUNNER), str(job_file)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}).returncode
    if rc != 0:
        tail = (work / f"{log_name}.log").read_text()[-1500:]
        raise RuntimeError(f"peer job {log_name} failed (exit {rc}):\n{tail}")
    return time.time() - t


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' dense packing along the last axis: int32 (R, C) -> unsigned codes (R, count).

    Element i sits at bit 4i (8-bit: 8i) of the row's bit stream, low bits first, stored unsigned
    (the signed code plus 2^(bits-1)); bits divides 32, so no element straddles two words.
    """
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = packed.to(torch.int64) & 0xFFFFFFFF  # (R, C) as unsigned
    vals = (words[..., None] >> shifts) & ((1 << bits) - 1)  # (R, C, per)
    return vals.reshape(*packed.shape[:-1], -1)[..., :count]


def find_checkpoint(out: Path) -> Path:
    """The directory holding config.json under a peer's output (AutoRound nests one level)."""
    if (out / "config.json").is_file():
        return out
    found = sorted(p.parent for p in out.glob("*/config.json"))
    if not found:
        raise RuntimeError(f"no checkpoint (config.json) under {out}")
    return found[0]


def read_fake_weights(ckpt: Path, original: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Weights of a fake-quantized checkpoint (dequantized floats, AutoRound's "fake" format).

    Only the layers whose weight differs from the fp32 original count as quantized (a peer that
    silently skips a layer leaves it bit-identical).
    """
    out = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                name = key[: -len(".weight")]
                if key.endswith(".weight") and name in original:
                    w = f.get_tensor(key).float()
                    if not torch.equal(w, original[name].weight.data.float()):
                        out[name] = w
    return out


def read_peer_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Dequantized weights (N, K) float32 of every quantized linear of a compressed-tensors checkpoint.

    pack-quantized: weight_packed int32 (N, ceil(K·b/32)), weight_scale (N, G), weight_shape (2,),
    asymmetric: weight_zero_point int32 (ceil(N·b/32), G) packed along the rows; w = (q − z) · s
    with q, z signed. int-quantized: weight int8 (N, K) and weight_scale.
    """
    config = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    bits_of = {}
    for group in config["config_groups"].values():
        bits_of[group["weights"]["num_bits"]] = group["weights"]
    files = sorted(ckpt.glob("*.safetensors"))
    tensors = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if key.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                               "weight"):
                    tensors[key] = f.get_tensor(key)
    out = {}
    for key, scale in tensors.items():
        if not key.endswith(".weight_scale"):
            continue
        name = key[: -len(".weight_scale")]
        scale = scale.float()
        if f"{name}.weight_packed" in tensors:
            packed = tensors[f"{name}.weight_packed"]
            n, k = tensors[f"{name}.weight_shape"].tolist()
            bits = packed.shape[1] * 32 // k
            offset = 1 << (bits - 1)
            q = unpack_int32(packed, bits, k).float() - offset  # (N, K) signed codes
            zp = tensors.get(f"{name}.weight_zero_point")
            z = (unpack_int32(zp.T.contiguous(), bits, n).T.float() - offset) if zp is not None else torch.zeros_like(scale)
        else:
            q = tensors[f"{name}.weight"].float()
            n, k = q.shape
            zp = tensors.get(f"{name}.weight_zero_point")
            z = zp.float() if zp is not None else torch.zeros_like(scale)
        g = k // scale.shape[1]
        w = (q.reshape(n, -1, g) - z.reshape(n, -1, 1)) * scale.reshape(n, -1, 1)
        out[name] = w.reshape(n, k)
    return out


def peer_groups(model: Model, kind: str) -> tuple[list[dict], list[str]]:
    """llm-compressor config groups (targets by name) and ignore list for a layout."""
    layout = model.layout(kind)
    groups: dict[tuple, list[str]] = {}
    for name, spec in layout.items():
        key = (spec.bits, spec.group_size, spec.symmetric)
        groups.setdefault(key, []).append(name)
    out = [{"targets": names, "layer_names": names, "num_bits": b, "group_size": g, "symmetric": s}
           for (b, g, s), names in groups.items()]
    ignore = [n for n, m in model.lm.model.named_modules() if isinstance(m, torch.nn.Linear) and n not in layout]
    return out, ignore


# ---------------------------------------------------------------- layer by layer

def layers_main(args) -> int:
    """GPTQ on the same (W, H) per layer: compress's variants vs llm-compressor's quantize_weight."""
    torch.set_num_threads(1)
    model = Model("minilm", quick=True)
    # H from the fp32 model's own inputs (one pass, every layer), identical for everyone.
    lm = model.lm
    layers = {n: m for n, m in model.linears.items()}
    accs = collect_hessians(lm.model, layers, [((), b) for b in model.batches], [token_mask(b) for b in model.batches])
    tensors = {}
    for n, m in layers.items():
        tensors[f"{n}.weight"] = m.weight.data.float().contiguous()
        tensors[f"{n}.hessian"] = accs[n].hessian.contiguous()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_file(tensors, work / "layers.safetensors")
        peer = {}
        for g in args.groups:
            for scale_dtype in (None, "float16"):
                job = {"method": "gptq_layers", "layers": str(work / "layers.safetensors"), "actorder": "static",
                       "groups": [{"num_bits": 4, "group_size": g, "symmetric": False}], "damp": DAMP,
                       "scale_dtype": scale_dtype, "out": str(work / f"llmc-{g}-{scale_dtype}.safetensors")}
                run_peer(job, work, f"layers-{g}-{scale_dtype}")
                with safe_open(job["out"], "pt") as f:
                    peer[(g, scale_dtype)] = {k: f.get_tensor(k) for k in f.keys()}
        variants = {"compress natural, dynamic groups (old default)": dict(act_order=False, static_groups=False),
                    "compress natural, static groups": dict(act_order=False, static_groups=True),
                    "compress act-order, static groups": dict(act_order=True),
                    "compress act-order, static, mse (always)": {},
                    "compress act-order, static, mse (kept per layer where it lowers the loss)": dict(act_order=True, mse=True),
                    "compress natural, dynamic, mse": dict(act_order=False, static_groups=False, mse=True)}
        for g in args.groups:
            spec = QuantSpec(4, g, False)
            totals: dict[str, float] = {}
            agree = {}
            for n in layers:
                W, H = tensors[f"{n}.weight"], tensors[f"{n}.hessian"]

                def loss(Wq):
                    d = W - Wq
                    return float(torch.einsum("nk,kl,nl->", d, H, d))

                base = loss(dequantize(quantize(W, spec)))
                totals["rtn"] = totals.get("rtn", 0.0) + 1.0
                for label, opts in variants.items():
                    if label.endswith("(always)"):  # the clip search without the per-layer pick
                        qw = _gptq(W, H, spec, DAMP, 128, True, True, "layer", DEFAULT_GRID, mse=True)
                    else:
                        qw = gptq_quantize(W, H, spec, damp=DAMP, **opts)
                    totals[label] = totals.get(label, 0.0) + loss(dequantize(qw)) / base
                    if label == "compress act-order, static groups":
                        mine = dequantize(qw)
                for sd in (None, "float16"):
                    p = peer[(g, sd)]
                    label = f"llm-compressor (scales {'fp16' if sd else 'fp32'})"
                    Wq = p[f"{n}.qweight"].float()
                    totals[label] = totals.get(label, 0.0) + loss(Wq) / base
                    s = p[f"{n}.scale"].repeat_interleave(g, dim=1)
                    z = p[f"{n}.zero_point"].repeat_interleave(g, dim=1)
                    codes = torch.round(Wq / s + z)
                    my_codes = torch.round(mine / s + z)
                    agree.setdefault(label, []).append(float((codes == my_codes).float().mean()))
            for label, tot in totals.items():
                row = {"group": g, "method": label, "loss_vs_rtn": tot / len(layers)}
                if label in agree:
                    row["codes_equal_to_compress_act_order"] = sum(agree[label]) / len(agree[label])
                rows.append(row)
                print(row, flush=True)
    header = (f"GPTQ layer by layer on the same H (MiniLM, fp32 inputs of each of the 36 linears), {date.today()}, "
              f"CPU: {cpu_name()}, torch {torch.__version__}, command: python bench/peers.py layers; "
              "loss = tr(ΔW H ΔWᵀ) relative to RTN's, averaged over layers")
    cols = ["group", "method", "loss_vs_rtn", "codes_equal_to_compress_act_order"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peers-layers-cpu.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (RESULTS / "peers-layers-cpu.md").write_text(markdown_table(rows, cols, header))
    print(markdown_table(rows, cols, header))
    return 0


COMPRESS_VARIANTS = {
    "compress rtn": dict(method="rtn"),
    "compress rtn+mse": dict(method="rtn", mse=True),
    "compress gptq, natural order, dynamic groups (before)": dict(act_order=False, static_groups=False),
    "compress gptq, act-order": dict(act_order=True),
    "compress gptq, act-order+mse": dict(act_order=True, mse=True),
    "compress gptq, act-order+refit1": dict(act_order=True, refit=1),
    "compress gptq, act-order+refit3": dict(act_order=True, refit=3),
    "compress gptq, act-order+mse+refit1": dict(act_order=True, mse=True, refit=1),
    "compress gptq, act-order+mse+refit3": dict(act_order=True, mse=True, refit=3),
    "compress gptq, act-order+refit1+fptarget0.25": dict(act_order=True, refit=1, fp_target=0.25),
    "compress gptq, act-order+refit1+fptarget0.5": dict(act_order=True, refit=1, fp_target=0.5),
    "compress gptq, act-order+refit1+fptarget1": dict(act_order=True, refit=1, fp_target=1.0),
    "compress gptq, act-order+mse+refit1+fptarget0.25": dict(act_order=True, mse=True, refit=1, fp_target=0.25),
    "compress gptq, act-order+mse+refit1+fptarget0.5": dict(act_order=True, mse=True, refit=1, fp_target=0.5),
    "compress gptq, act-order+refit1+fptarget0.25+tokendamp1": dict(act_order=True, refit=1, fp_target=0.25,
                                                                      token_damp=1.0),
    "compress gptq, act-order+mse+refit1+fptarget0.25+tokendamp1": dict(act_order=True, mse=True, refit=1,
                                                                          fp_target=0.25, token_damp=1.0),
}
PEER_JOBS = {
    "llm-compressor gptq (actorder static)": {"method": "gptq", "actorder": "static"},
    "llm-compressor gptq+mse observer": {"method": "gptq", "actorder": "static", "observer": "mse"},
    "llm-compressor awq": {"method": "awq"},
    "autoround (200 iters)": {"method": "autoround", "iters": 200},
}


COLS = ["model", "layout", "bits", "method", "one_minus_cosine", "mean_kl", "perplexity", "on_calib", "seconds",
        "note"]


def write_results(rows: list[dict], header: str, stem: str) -> None:
    """bench/results/<stem>.{json,md}; rewritten after every row, so a long run keeps what it measured."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown_table(rows, COLS, header))


def models_main(args) -> int:
    # One thread for everyone (peers too, through OMP_NUM_THREADS): on a shared 2-core machine,
    # spinning thread pools of concurrent jobs starve each other and timings become noise.
    torch.set_num_threads(1)
    rows = []
    layouts = args.layouts.split(",")
    header = (f"Peers side by side, {date.today()}, CPU: {cpu_name()} (2 cores, shared; 1 thread per job), "
              f"torch {torch.__version__}, command: python bench/peers.py {' '.join(sys.argv[1:])}".rstrip())
    stem = args.out or ("peers-cpu" + ("-quick" if args.quick else ""))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            model = Model(name, args.quick)
            calib = work / f"{name}-calib.json"
            calib.write_text(json.dumps(model.rows()))
            for kind in layouts:
                plan_secs = model.plan(kind, work, json.loads(args.plan_quantizer), args.plan_method, args.plan_samples) if kind.startswith("plan") else 0.0
                layout = model.layout(kind)
                base = {"model": name, "layout": kind, "bits": round(model.bits(layout), 3),
                        "calib_tokens": model.calib_tokens}

                def record(method: str, weights: dict | None, secs: float, note: str = "") -> None:
                    row = {**base, "method": method, "seconds": round(secs, 1), "note": note}
                    if weights is not None:
                        missing = [n for n in layout if n not in weights]
                        if missing:
                            row["note"] = (note + f"; {len(missing)} of {len(layout)} linears left unquantized "
                                           f"(bits: those at 16)").lstrip("; ")
                            row["bits"] = round(model.bits(layout, tuple(missing)), 3)
                        row.update(model.metric(weights))
                    rows.append(row)
                    print(row, flush=True)
                    write_results(rows, header, stem)

                for label, opts in COMPRESS_VARIANTS.items():
                    if args.compress and not any(c in label for c in args.compress.split(",")):
                        continue
                    for damp in (float(d) for d in args.damp.split(",")):
                        t = time.time()
                        weights = compress_weights(model, layout, **opts, damp=damp)
                        record(label + (f"+damp{damp:g}" if damp != DAMP else ""), weights,
                               time.time() - t + plan_secs, f"planning {plan_secs:.0f} s included" if plan_secs else "")
                for label, peer in PEER_JOBS.items():
                    if not any(p in label for p in args.peers.split(",")):
                        continue
                    peer_label = label + (f" damp{args.peer_damp:g}" if args.peer_damp != DAMP else "")
                    refused = model.peer_refuses(kind) if peer["method"] != "autoround" else None
                    if refused:
                        record(peer_label, None, 0.0, f"refused: {refused}")
                        continue
                    groups, ignore = peer_groups(model, kind)
                    out = work / f"{name}-{kind}-{peer['method']}-{len(rows)}"
                    job = {**peer, "model": str(model.path), "kind": model.lm.kind, "calib": str(calib), "out": str(out),
                           "groups": groups, "ignore": ignore, "ignore_names": ignore, "damp": args.peer_damp,
                           "seq_len": model.seq_len}
                    try:
                        secs = run_peer(job, work, out.name)
                    except RuntimeError as exc:
                        last = [ln for ln in str(exc).splitlines() if ln.strip()][-1][:200]
                        record(peer_label, None, 0.0, f"failed: {last}")
                        continue
                    ckpt = find_checkpoint(out)
                    packed = "quantization_config" in json.loads((ckpt / "config.json").read_text())
                    weights = read_peer_weights(ckpt) if packed else read_fake_weights(ckpt, model.linears)
                    record(peer_label, {n: w for n, w in weights.items() if n in layout}, secs)
    print(markdown_table(rows, COLS, header))
    return 0


def noise_main(args) -> int:
    """The spread of runs that differ only by float rounding: MiniLM int4 g32, act-order GPTQ with
    block sizes 32-256 (the same algorithm, other summation orders), compress and llm-compressor,
    and llm-compressor with its scales rounded to float16 as compress stores them."""
    torch.set_num_threads(1)
    model = Model("minilm", quick=False)
    layout = model.layout("g32")
    header = (f"GPTQ run-to-run spread, MiniLM int4 g32 asym, act-order (static groups), {date.today()}, "
              f"CPU: {cpu_name()} (1 thread), torch {torch.__version__}, command: python bench/peers.py noise")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calib.json"
        calib.write_text(json.dumps(model.rows()))
        groups, ignore = peer_groups(model, "g32")
        for who, block, scale_dtype in [("compress", b, "float16") for b in (32, 64, 128, 256)] + \
                [("llm-compressor", b, None) for b in (32, 64, 128)] + [("llm-compressor", 128, "float16")]:
            t = time.time()
            if who == "compress":
                weights = compress_weights(model, layout, act_order=True, block_size=block)
            else:
                out = work / f"llmc-{block}-{scale_dtype}"
                job = {"method": "gptq", "actorder": "static", "model": str(model.path), "kind": model.lm.kind,
                       "calib": str(calib), "out": str(out), "ignore": ignore, "damp": DAMP, "block_size": block,
                       "seq_len": model.seq_len, "groups": [dict(g, scale_dtype=scale_dtype) for g in groups]}
                run_peer(job, work, out.name)
                weights = read_peer_weights(out)
            rows.append({"method": who, "block_size": block, "scales": scale_dtype or "float32",
                         "seconds": round(time.time() - t, 1), **model.metric(weights)})
            print(rows[-1], flush=True)
    cols = ["method", "block_size", "scales", "one_minus_cosine", "seconds"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peers-noise-cpu.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (RESULTS / "peers-noise-cpu.md").write_text(markdown_table(rows, cols, header))
    print(markdown_table(rows, cols, header))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="models", choices=["models", "layers", "noise"])
    ap.add_argument("--quick", action="store_true", help="fewer evaluation samples (a smoke run)")
    ap.add_argument("--models", default="minilm,stories")
    ap.add_argument("--layouts", default="g32,g128,mixed")
    ap.add_argument("--plan-method", default="fisher", help="the analyzer of the planned layouts (default fisher)")
    ap.add_argument("--plan-samples", type=int, help="the analyzer's calibration samples (default: its own)")
    ap.add_argument("--plan-quantizer", default='"gptq"',
                    help='the quantizer the planned layouts are priced for, as JSON: "gptq" or a plan section '
                         'such as {"method": "gptq", "mse": true, "refit": 1}')
    ap.add_argument("--damp", default=str(DAMP),
                    help="compress's GPTQ damping, comma-separated to run each (the peers keep %(default)s)")
    ap.add_argument("--peer-damp", type=float, default=DAMP, help="the peers' GPTQ damping (default %(default)s)")
    ap.add_argument("--compress", default="", help="only compress variants whose label contains one of these")
    ap.add_argument("--peers", default="llm-compressor gptq,awq,autoround",
                    help="peer jobs whose label contains one of these (comma-separated)")
    ap.add_argument("--groups", default="32,128", help="layers mode: group sizes")
    ap.add_argument("--out", default="", help="results file stem (default peers-cpu)")
    args = ap.parse_args()
    args.groups = [int(g) for g in args.groups.split(",")]
    if args.mode == "layers":
        return layers_main(args)
    if args.mode == "noise":
        return noise_main(args)
    return models_main(args)


if __name__ == "__main__":
    sys.exit(main())
