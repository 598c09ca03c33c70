"""Runs one peer quantizer (llm-compressor GPTQ / AWQ / RTN, or AutoRound) in the peers' own venv.

Started by bench/peers.py as a subprocess with the peers' interpreter; it imports only the peer
libraries (never compress), reads a JSON job and writes the peer's compressed-tensors checkpoint,
which bench/peers.py then reads back as files. Job fields:

    {"method": "gptq" | "awq" | "rtn" | "autoround", "model": dir, "kind": "encoder" | "causal-lm",
     "calib": JSON file (a list of {"input_ids": [...], "attention_mask": [...], ...}, one per sample),
     "out": dir, "groups": [{"targets": [...], "num_bits": 4, "group_size": 32, "symmetric": false}, ...],
     "ignore": [...], "actorder": "static" | null, "observer": null | "mse", "damp": 0.01, "seq_len": 128}

    python bench/_peer_run.py job.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# bench/ holds kernels.py, which would shadow the `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _weights_args(g: dict, observer: str | None) -> dict:
    args = {"num_bits": g["num_bits"], "type": "int", "symmetric": g["symmetric"]}
    if g.get("group_size", -1) == -1:
        args["strategy"] = "channel"
    else:
        args.update(strategy="group", group_size=g["group_size"])
    if observer:
        args["observer"] = observer
    if g.get("scale_dtype") == "float16":  # scales rounded to float16 as compress stores them
        import torch

        args["scale_dtype"] = torch.float16
    return args


def run_llmcompressor(job: dict, model, tok, rows: list[dict]) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot

    groups = {f"group_{i}": {"targets": g["targets"], "weights": _weights_args(g, job.get("observer"))}
              for i, g in enumerate(job["groups"])}
    if job["method"] == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = GPTQModifier(config_groups=groups, ignore=job.get("ignore", []), actorder=job.get("actorder"),
                              dampening_frac=job.get("damp", 0.01), block_size=job.get("block_size", 128))
    elif job["method"] == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups=groups, ignore=job.get("ignore", []))
        import torch

        if not torch.cuda.is_available():
            # AWQ pins its cached activations for host-to-device copies, which needs an accelerator;
            # on a CPU-only machine there is nothing to copy, so pinning is skipped.
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    else:  # rtn: the same quantization config, no calibration algorithm
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe = QuantizationModifier(config_groups=groups, ignore=job.get("ignore", []))
    if job.get("dump_hessians"):  # diagnostics: save each module's normalised H as GPTQ gets it
        import llmcompressor.modifiers.gptq.base as gptq_base
        from safetensors.torch import save_file

        names = {m: n for n, m in model.named_modules()}
        dumped = {}
        original = gptq_base.prepare_batch

        def prepare_and_dump(batch, qparams, hessians, counts):
            out = original(batch, qparams, hessians, counts)
            for module, h in zip(batch, out[1]):
                dumped[names[module]] = h.clone().contiguous()
            return out

        gptq_base.prepare_batch = prepare_and_dump
    ds = Dataset.from_list(rows)
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(rows),
            shuffle_calibration_samples=False, max_seq_length=job.get("seq_len"), batch_size=1,
            pipeline=job.get("pipeline"))
    if job.get("dump_hessians"):
        save_file(dumped, job["dump_hessians"])
    model.save_pretrained(job["out"], save_compressed=True)
    tok.save_pretrained(job["out"])


def run_autoround(job: dict, model, tok, rows: list[dict]) -> None:
    import torch
    from auto_round import AutoRound

    # The largest 4-bit group is AutoRound's default scheme; every other group is per-layer config.
    g = max((g for g in job["groups"] if g["num_bits"] == 4), key=lambda g: len(g["layer_names"]))
    layer_config = {}
    for other in job["groups"]:
        if other is not g:
            for name in other["layer_names"]:
                layer_config[name] = {"bits": other["num_bits"], "group_size": other.get("group_size", -1),
                                      "sym": other["symmetric"]}
    for name in job.get("ignore_names", []):
        layer_config[name] = {"bits": 16}
    # The same ids as everyone's. AutoRound skips samples shorter than seqlen and batches equal
    # lengths, so encoder texts are padded to seqlen with their attention masks (its loss ignores
    # pad positions); causal-LM windows are all seqlen long already.
    seqlen = job.get("seq_len", 128)
    if job["kind"] == "causal-lm":
        data = [torch.tensor([r["input_ids"]]) for r in rows]
    else:
        data = []
        for r in rows:
            pad = seqlen - len(r["input_ids"])
            item = {k: torch.tensor([v + [tok.pad_token_id if k == "input_ids" else 0] * pad]) for k, v in r.items()}
            data.append(item)
    ar = AutoRound(model, tok, bits=4, group_size=g["group_size"], sym=g["symmetric"], dataset=data,
                   nsamples=len(rows), seqlen=seqlen, batch_size=job.get("ar_batch", 8),
                   iters=job.get("iters", 200), layer_config=layer_config or None, device_map="cpu")
    ar.quantize_and_save(job["out"], format=job.get("ar_format", "fake"))


def run_layers(job: dict) -> None:
    """llm-compressor's GPTQ (its quantize_weight and weight observer) on given (W, H) pairs.

    job["layers"]: safetensors with "<name>.weight" (N, K) and "<name>.hessian" (K, K) float32;
    writes job["out"]: "<name>.qweight" (its fake-quantized weight), ".scale", ".zero_point".
    """
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer
    from safetensors.torch import load_file, save_file

    tensors = load_file(job["layers"])
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    (g,) = job["groups"]
    out = {}
    for name in names:
        W, H = tensors[f"{name}.weight"], tensors[f"{name}.hessian"]
        args = dict(_weights_args(g, job.get("observer")), actorder=job.get("actorder"))
        if job.get("scale_dtype") == "float16":
            args["scale_dtype"] = torch.float16
        qargs = QuantizationArgs(**args)
        obs = Observer.load_from_registry(qargs.observer or "memoryless_minmax", base_name="weight", args=qargs)
        obs(W)
        qp = obs.get_qparams()
        q, _, _ = quantize_weight(W[None].clone(), H[None].clone(), qp["scale"][None], qp["zero_point"][None], None,
                                  qargs, blocksize=job.get("block_size", 128), percdamp=job.get("damp", 0.01))
        out[f"{name}.qweight"] = q[0].contiguous()
        out[f"{name}.scale"] = qp["scale"].float().contiguous()
        out[f"{name}.zero_point"] = qp["zero_point"].float().contiguous()
    save_file(out, job["out"])


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    if job["method"] == "gptq_layers":
        run_layers(job)
        return 0
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)  # as every job of bench/peers.py (a shared 2-core machine)
    cls = AutoModelForCausalLM if job["kind"] == "causal-lm" else AutoModel
    model = cls.from_pretrained(job["model"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(job["model"])
    rows = json.loads(Path(job["calib"]).read_text())
    t = time.time()
    if job["method"] == "autoround":
        run_autoround(job, model, tok, rows)
    else:
        run_llmcompressor(job, model, tok, rows)
    Path(job["out"], "peer_job.json").write_text(json.dumps({**job, "seconds": round(time.time() - t, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
