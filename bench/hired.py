"""HiRED token dropping: quality on real data (MNIST ViT) and speed (LLaVA-Next prefill / generate).

Quality: a ViTForImageClassification (CLS token, 4x4 patches -> 49 tokens) is trained here on 8,000
of the 10,000 MNIST test images in ../shared/data/mnist and evaluated on the 2,000 others. It is
saved with ``save_pretrained``, reloaded, and HiRED is applied as a plan's ``token_dropping`` section
would apply it (``HiredConfig.from_dict`` + ``apply_hired``): tokens are dropped right after encoder
layer L, chosen by layer L's CLS attention; later layers see CLS + the kept tokens. Baselines drop
after the same layer: k random tokens (mean of 3 seeds) and the first k tokens in raster order.
Each row also gives the share of the model's FLOPs that is left (torch's FLOP counter on an eager
copy, one image), and the rows on the accuracy / FLOPs Pareto front; a second table measures the
library's default (a plan section with no ``final_layer``): where it drops, the share of patch
tokens kept, the share of tokens the encoder layers process, FLOPs and accuracy.

Speed: LlavaNextForConditionalGeneration with random weights, one 2x2-grid image (5 partitions):
prefill latency (one forward over the prompt), end-to-end generation throughput (new tokens / time
of ``generate``), peak memory, for the stock model and HiRED at rates 1.0 / 0.4 / 0.2. On CUDA the
real llava-v1.6-mistral-7b shapes (fp16); on the CPU a small configuration (float32).

    python bench/hired.py --part quality      # ~15 minutes on 1 CPU thread (3 seeds x 25 epochs)
    python bench/hired.py --part speed        # CPU small config; real size too when CUDA is present
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from compress.data import shared_data_dir  # noqa: E402
from compress.hired import HiredConfig, apply_hired, cls_attention, hired_image_features, remove_hired  # noqa: E402
from _common import cpu_name  # noqa: E402  (bench/ is the script's directory)

RESULTS = Path(__file__).resolve().parent / "results"




def machine() -> dict:
    info = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write(name: str, payload: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {RESULTS / name}.json and .md")


def markdown(header: list[str], rows: list[list], title: str) -> str:
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ quality


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(split_seed: int):
    """(train_x, train_y, test_x, test_y): 8,000 / 2,000 of the MNIST test set, normalised float32."""
    data = shared_data_dir()
    if data is None or not (data / "mnist").is_dir():
        raise SystemExit("MNIST not found: set COMPRESS_DATA to a folder holding mnist/ (see ../shared/data)")
    x = torch.tensor(read_idx(data / "mnist" / "t10k-images-idx3-ubyte.gz")).float().div(255)
    x = ((x - 0.1307) / 0.3081)[:, None]                                                # (10000, 1, 28, 28)
    y = torch.tensor(read_idx(data / "mnist" / "t10k-labels-idx1-ubyte.gz")).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    return x[perm[:8000]], y[perm[:8000]], x[perm[8000:]], y[perm[8000:]]


def augment(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Random rotation (+-10 deg), scale (+-10 %) and shift (+-3 px), each times ``strength``, of
    normalised (B, 1, 28, 28)."""
    n = x.shape[0]
    u = (torch.rand(4, n, generator=gen) * 2 - 1) * strength
    angle, scale, shift = u[0] * math.radians(10), 1 + u[1] * 0.1, u[2:] * 3 / 14
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)
    background = -0.1307 / 0.3081
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - background, grid, align_corners=False) + background


def train_vit(args, tx, ty, seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=args.width,
                    num_hidden_layers=args.layers, num_attention_heads=4, intermediate_size=2 * args.width,
                    num_labels=10, attn_implementation="sdpa")
    model = ViTForImageClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * math.ceil(len(tx) / args.batch)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(tx), generator=gen)
        for i in range(0, len(tx), args.batch):
            idx = order[i: i + args.batch]
            loss = F.cross_entropy(model(augment(tx[idx], gen, args.aug)).logits, ty[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s wall, "
              f"{time.process_time() - cpu_start:.0f} s CPU", flush=True)
    return model.eval(), time.perf_counter() - start, time.process_time() - cpu_start


@torch.no_grad()
def accuracy(model, x, y, batch: int = 500) -> float:
    hits = sum(int((model(x[i: i + batch]).logits.argmax(1) == y[i: i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def baseline_hook(model, layer: int, rate: float, rule: str, seed: int):
    """Drop tokens after ``layer`` by a rule that ignores attention: 'random' or 'first' k tokens."""
    gen = torch.Generator().manual_seed(seed)

    def drop(module, args, output):
        b, t, d = output.shape
        k = max(1, math.floor((t - 1) * rate + 1e-9))
        if rule == "first":
            keep = torch.arange(1, k + 1).expand(b, k)
        else:
            keep = torch.stack([torch.randperm(t - 1, generator=gen)[:k].sort().values + 1 for _ in range(b)])
        keep = torch.cat([torch.zeros(b, 1, dtype=torch.long), keep], 1)
        return output.gather(1, keep[..., None].expand(-1, -1, d))

    return model.vit.layers[layer].register_forward_hook(drop)


@torch.no_grad()
def ink_share(model, x, layer: int, rate: float) -> tuple[float, float]:
    """(share of HiRED's kept tokens that hold ink, share of all tokens that do) after ``layer``.

    A patch holds ink when any of its pixels is above 0.2 (raw intensity); it explains what the CLS
    attention picks: strokes or background.
    """
    attn, store = model.vit.layers[layer].attention, {}
    handles = [getattr(attn, f"{n}_proj").register_forward_hook(lambda m, a, o, n=n: store.__setitem__(n, o))
               for n in ("q", "k")]
    model(x)
    for handle in handles:
        handle.remove()
    scores = cls_attention(store["q"], store["k"], attn.head_dim, attn.scaling)         # (B, 49)
    raw = x * 0.3081 + 0.1307
    ink = (raw.view(len(x), 7, 4, 7, 4).amax(dim=(2, 4)) > 0.2).flatten(1)              # (B, 49) raster
    kept = scores.topk(max(1, math.floor(49 * rate + 1e-9)), dim=1).indices
    return ink.gather(1, kept).float().mean().item(), ink.float().mean().item()


@torch.no_grad()
def flops(model, x) -> int:
    """FLOPs of one forward over ``x``, counted on an eager copy (torch's counter misses CPU SDPA kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.set_attn_implementation("sdpa")
    return counter.get_total_flops()


@torch.no_grad()
def tokens_per_layer(model, x) -> list[int]:
    """Tokens each encoder layer receives, measured from ``output_hidden_states`` (inputs of layers 0 .. L-1)."""
    return [h.shape[1] for h in model(x[:1], output_hidden_states=True).hidden_states[:-1]]


def evaluate_default(model, vx, vy, rates: list[float]) -> list[dict]:
    """The library's default: a plan section that gives only the rate. Where it drops, measured."""
    out, stock_flops = [], flops(model, vx[:1])
    for rate in rates:
        apply_hired(model, HiredConfig.from_dict({"method": "hired", "rate": rate}))
        tokens = tokens_per_layer(model, vx)
        drop = next((i - 1 for i in range(1, len(tokens)) if tokens[i] < tokens[0]), None)
        out.append({"rate": rate, "drop_after_layer": drop, "kept_patch_share": (tokens[-1] - 1) / (tokens[0] - 1),
                    "encoder_token_share": sum(tokens) / (len(tokens) * tokens[0]),
                    "flops_share": flops(model, vx[:1]) / stock_flops, "accuracy": accuracy(model, vx, vy)})
        remove_hired(model)
        print({"default": out[-1]}, flush=True)
    return out


def cheapest_within(summary: list[dict], full: float, points: float) -> dict[int, dict | None]:
    """Per drop layer, the row with the fewest FLOPs whose mean HiRED accuracy is within ``points``
    percentage points of all tokens (None when no rate of that layer is)."""
    best: dict[int, dict | None] = {}
    for row in summary:
        layer = row["drop_after_layer"]
        best.setdefault(layer, None)
        if 100 * (full - row["hired"]) <= points and (best[layer] is None
                                                         or row["flops_share"] < best[layer]["flops_share"]):
            best[layer] = row
    return best


def evaluate_drops(model, vx, vy, layers: list[int], rates: list[float]) -> list[dict]:
    """Held-out accuracy of one trained model for every (drop layer, rate), HiRED and baselines."""
    out, stock_flops = [], flops(model, vx[:1])
    for layer in layers:
        for rate in rates:
            row = {"drop_after_layer": layer, "rate": rate, "kept_tokens": max(1, math.floor(49 * rate + 1e-9))}
            apply_hired(model, HiredConfig(rate=rate, final_layer=layer))
            row["flops_share"] = flops(model, vx[:1]) / stock_flops
            remove_hired(model)
            for reduce in ("sum", "max"):
                # the plan's token_dropping section, applied as compress apply / load will apply it
                plan_section = {"method": "hired", "rate": rate, "final_layer": layer, "head_reduce": reduce}
                apply_hired(model, HiredConfig.from_dict(plan_section))
                row["hired" if reduce == "sum" else "hired_head_max"] = accuracy(model, vx, vy)
                remove_hired(model)
            runs = []
            for seed in range(3):
                handle = baseline_hook(model, layer, rate, "random", seed)
                runs.append(accuracy(model, vx, vy))
                handle.remove()
            row["random"] = statistics.mean(runs)
            handle = baseline_hook(model, layer, rate, "first", 0)
            row["first_k"] = accuracy(model, vx, vy)
            handle.remove()
            row["hired_ink_share"], row["all_tokens_ink_share"] = ink_share(model, vx, layer, rate)
            out.append(row)
            print(row, flush=True)
    return out


def run_quality(args) -> None:
    from transformers import ViTForImageClassification

    tx, ty, vx, vy = load_mnist(split_seed=0)
    rates = [1.0, 0.6, 0.4, 0.2, 0.1]
    layers = [int(v) for v in args.drop_layers.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    runs = []
    for seed in seeds:
        model, train_s, train_cpu = train_vit(args, tx, ty, seed)
        full = accuracy(model, vx, vy)
        print(f"seed {seed}: held-out accuracy {full:.4f} ({train_s:.0f} s wall, {train_cpu:.0f} s CPU)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            reloaded = ViTForImageClassification.from_pretrained(tmp).eval()
        if accuracy(reloaded, vx, vy) != full:
            raise RuntimeError("the reloaded model does not reproduce the trained one")
        runs.append({"seed": seed, "full_accuracy": full, "train_wall_s": round(train_s, 1),
                     "train_cpu_s": round(train_cpu, 1), "results": evaluate_drops(reloaded, vx, vy, layers, rates),
                     "default": evaluate_default(reloaded, vx, vy, [r for r in rates if r < 1])})
    keys = ("hired", "hired_head_max", "random", "first_k", "hired_ink_share", "flops_share")

    def cell(values: list[float], digits: int = 1) -> str:
        mean = 100 * statistics.mean(values)
        return f"{mean:.{digits}f}" if len(values) == 1 else \
            f"{mean:.{digits}f} ({100 * min(values):.{digits}f}-{100 * max(values):.{digits}f})"

    rows, summary, accuracy_cells = [], [], []
    for i, first in enumerate(runs[0]["results"]):
        per = {k: [r["results"][i][k] for r in runs] for k in keys}
        accuracy_cells.append([cell(per[k]) for k in keys[:4]])
        summary.append({"drop_after_layer": first["drop_after_layer"], "rate": first["rate"],
                        "kept_tokens": first["kept_tokens"], **{k: statistics.mean(v) for k, v in per.items()}})
    for row, accuracies in zip(summary, accuracy_cells):
        rows.append([row["drop_after_layer"], row["rate"], row["kept_tokens"], f"{100 * row['flops_share']:.0f}"]
                    + accuracies + [f"{100 * row['hired_ink_share']:.0f}"])
    full_mean = statistics.mean(r["full_accuracy"] for r in runs)
    tolerances = (0.5, 1.0, 2.0)
    cheapest = {t: cheapest_within(summary, full_mean, t) for t in tolerances}
    choice_rows = [[layer] + [("-" if cheapest[t][layer] is None else
                               f"{100 * cheapest[t][layer]['flops_share']:.0f} (rate {cheapest[t][layer]['rate']})")
                              for t in tolerances] for layer in layers]
    default_keys = ("kept_patch_share", "encoder_token_share", "flops_share", "accuracy")
    default_summary, default_rows = [], []
    for i, first in enumerate(runs[0]["default"]):
        per = {k: [r["default"][i][k] for r in runs] for k in default_keys}
        drops = sorted({r["default"][i]["drop_after_layer"] for r in runs}, key=str)
        default_summary.append({"rate": first["rate"], "drop_after_layer": drops,
                                **{k: statistics.mean(v) for k, v in per.items()}})
        default_rows.append([first["rate"], ", ".join(map(str, drops))]
                            + [f"{100 * statistics.mean(per[k]):.0f}" for k in default_keys[:3]]
                            + [cell(per["accuracy"])])
    info = machine()
    command = "python bench/hired.py " + " ".join(sys.argv[1:])
    fulls = [r["full_accuracy"] for r in runs]
    cpu = statistics.mean(r["train_cpu_s"] for r in runs)
    setup = {"layers": args.layers, "width": args.width, "heads": 4, "patch": 4, "tokens": 49, "epochs": args.epochs,
             "lr": args.lr, "aug": args.aug, "batch": args.batch, "seeds": seeds, "train_images": len(tx),
             "heldout_images": len(vx)}
    title = (f"HiRED on an MNIST ViT ({args.layers} layers, width {args.width}, 49 patch tokens + CLS), "
             f"{len(seeds)} training seeds: held-out accuracy (%) on {len(vx)} images, mean (min-max over seeds). "
             f"All tokens: {cell(fulls, 2)}. Each model trained {args.epochs} epochs on {len(tx)} images in "
             f"{cpu:.0f} CPU s. {info['cpu']}, {info['threads']} threads, {info['date']}. "
             f"Command: {command}")
    title += ("\n\nFLOPs %: the model's FLOPs left with HiRED (heads summed), of the stock model's (one image, "
              "torch.utils.flop_counter on an eager copy). Kept ink %: share of HiRED's kept tokens that hold ink; "
              f"{100 * runs[0]['results'][0]['all_tokens_ink_share']:.0f} % of all tokens do.")
    table = markdown(["drop after layer", "rate", "kept tokens", "FLOPs %", "HiRED (heads summed)",
                      "HiRED (max over heads)", "random (mean of 3 draws)", "first k", "HiRED kept ink %"],
                     rows, title)
    table += "\n\n" + markdown(
        ["drop after layer"] + [f"within {t:g} point{'s' if t != 1 else ''}" for t in tolerances], choice_rows,
        "Where to drop: per drop layer, the fewest FLOPs % (and the rate) at which HiRED's mean accuracy stays "
        "within 0.5 / 1 / 2 points of all tokens.")
    table += "\n\n" + markdown(
        ["rate", "drops after layer", "patch tokens kept %", "tokens through the encoder layers %", "FLOPs %",
         "accuracy"], default_rows,
        "The default: a plan section with only the rate (no final_layer), same models and images; the layer, "
        "the token shares and the FLOPs are measured on the wrapped model.")

    def brief(row: dict | None) -> dict | None:
        return None if row is None else {"rate": row["rate"], "flops_share": row["flops_share"]}

    choice = {f"within_{t:g}_points": {str(k): brief(v) for k, v in cheapest[t].items()} for t in tolerances}
    write("hired_quality", {"machine": info, "setup": setup, "command": command, "summary": summary,
                            "cheapest_within": choice, "default": default_summary, "runs": runs}, table)


# ------------------------------------------------------------------------------------------ speed


def llava_next_config(size: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig

    if size == "real":  # llava-hf/llava-v1.6-mistral-7b-hf shapes
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu")
        text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768,
                             rope_theta=1000000.0, sliding_window=None)
        tile, token = 336, 32000
    else:
        vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                                  image_size=112, patch_size=14, projection_dim=128)
        text = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=4096)
        tile, token = 112, 4000
    pins = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=token, image_grid_pinpoints=pins,
                          vision_feature_layer=-2, attn_implementation="sdpa")
    return cfg, tile


class Memory:
    """Peak memory of a block, total and above what was resident when it started (activations, KV
    cache): the CUDA allocator's peak, or on the CPU the process's peak RSS (VmHWM, reset per block)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0.0

    def _status_mib(self, key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {key} in /proc/self/status")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status_mib("VmRSS")

    def peak(self) -> tuple[float, float]:
        """(peak MiB, peak MiB above the start)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            peak = self._status_mib("VmHWM")
        return peak, peak - self.base


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of ``repeats`` calls after one warm-up, and the last result."""
    out = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), out


@torch.no_grad()
def run_speed_on(size: str, device: torch.device, dtype: torch.dtype, args) -> dict:
    from transformers import LlavaNextForConditionalGeneration

    cfg, tile = llava_next_config(size)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B model in float32 would double the memory
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    image_sizes = torch.tensor([[2 * tile, 2 * tile]] * args.gen_batch, device=device)     # 2x2 grid: 5 partitions
    pixels = torch.randn(args.gen_batch, 5, 3, tile, tile, device=device, dtype=dtype)
    n_image = model.model.get_image_features(pixels, image_sizes).pooler_output[0].shape[0]
    text = torch.randint(1, cfg.image_token_id, (args.gen_batch, 24), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([text[:, :8], torch.full((args.gen_batch, n_image), cfg.image_token_id), text[:, 8:]], 1).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
              "image_sizes": image_sizes}
    memory = Memory(device)
    settings = [("stock", None)] + [(f"HiRED {r}", HiredConfig(rate=r)) for r in (1.0, 0.4, 0.2)]
    rows = []
    for name, hired in settings:
        if hired is not None:
            apply_hired(model, hired)
            visual = hired_image_features(model, pixels, image_sizes)[2][0]
        else:
            visual = n_image
        memory.reset()
        prefill, prefill_cpu, _ = timed(lambda: model(**inputs, logits_to_keep=1), device, args.repeats)
        gen_s, _, out = timed(lambda: model.generate(**inputs, max_new_tokens=args.new_tokens,
                                                     min_new_tokens=args.new_tokens, do_sample=False), device, 1)
        peak, extra = memory.peak()
        new = out.shape[1] - ids.shape[1]
        rows.append({"setting": name, "visual_tokens_per_image": visual,
                     "prompt_tokens": ids.shape[1] - n_image + visual,
                     "prefill_s": prefill, "prefill_cpu_s": prefill_cpu, "generate_s": gen_s, "new_tokens": new,
                     "throughput_tok_s": args.gen_batch * new / gen_s, "peak_mib": peak, "peak_extra_mib": extra})
        print(rows[-1], flush=True)
        if hired is not None:
            remove_hired(model)
    base = rows[0]
    for r in rows:
        r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"]
        r["throughput_gain"] = r["throughput_tok_s"] / base["throughput_tok_s"]
    return {"size": size, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": args.gen_batch,
            "image_tokens_stock": n_image, "rows": rows}


def speed_table(res: dict, info: dict) -> str:
    where = info.get("gpu", info["cpu"]) if res["device"].startswith("cuda") else info["cpu"]
    title = (f"HiRED speed, LLaVA-Next ({res['size']} config, random weights, {res['dtype']}) on {where}, "
             f"batch {res['batch']}, one 2x2-grid image ({res['image_tokens_stock']} stock image tokens), "
             f"{info['date']}, threads {info['threads']}, load {info['load_avg_1m']}. "
             f"Command: python bench/hired.py --part speed")
    header = ["setting", "visual tokens", "prompt tokens", "prefill (ms)", "prefill CPU (ms)", "prefill speed-up",
              f"generate {res['rows'][0]['new_tokens']} tok (s)", "throughput (tok/s)", "gain", "peak memory (MiB)",
              "peak above start (MiB)"]
    rows = [[r["setting"], r["visual_tokens_per_image"], r["prompt_tokens"], f"{1000 * r['prefill_s']:.1f}",
             f"{1000 * r['prefill_cpu_s']:.1f}", f"{r['prefill_speedup']:.2f}x", f"{r['generate_s']:.2f}",
             f"{r['throughput_tok_s']:.1f}", f"{r['throughput_gain']:.2f}x", f"{r['peak_mib']:.0f}",
             f"{r['peak_extra_mib']:.0f}"] for r in res["rows"]]
    return markdown(header, rows, title)


def run_speed(args) -> None:
    info = machine()
    runs = [("hired_speed_cpu", "small", torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        runs.append(("hired_speed_gpu", "real", torch.device("cuda"), torch.float16))
    else:
        print("no CUDA device: the real-size LLaVA-Next run is skipped (GPU numbers are not measured)")
    for name, size, device, dtype in runs:
        res = run_speed_on(size, device, dtype, args)
        write(name, {"machine": info, **res}, speed_table(res, info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["quality", "speed", "all"], default="all")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (the train / held-out split is fixed)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aug", type=float, default=0.5, help="augmentation strength (0: none)")
    ap.add_argument("--batch", type=int, default=64, help="training batch size")
    ap.add_argument("--gen-batch", type=int, default=1, help="prompts per forward / generate in the speed part")
    ap.add_argument("--drop-layers", default="0,1,2", help="encoder layers after which tokens are dropped")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("quality", "all"):
        run_quality(args)
    if args.part in ("speed", "all"):
        run_speed(args)


if __name__ == "__main__":
    main()
