"""End-to-end decode tokens/s and prefill time of a Llama-2-7B-shaped model with random weights:
fp16 vs uniform int4 vs int8 vs a mixed plan, the decode step replayed as a CUDA graph so that launch
overhead does not hide the kernels (eager decode is reported beside it).

The model is a compact Llama (RMSNorm, rotary attention with a static KV cache, SwiGLU MLP) built
from ``transformers.LlamaConfig`` (its defaults are Llama-2-7B's shapes) directly in fp16 on the GPU;
speed does not need trained weights. Quantized variants swap every decoder-layer nn.Linear for
``QuantLinear.from_linear`` one layer at a time (lm_head and embeddings stay fp16), and the fp16
modules are put back afterwards. Bandwidth share = bytes read per token (weights + KV cache) x
tokens/s / copy bandwidth measured in the same run.

    python bench/decode.py                      # Llama-2-7B shape, prompt 128, 128 new tokens
    python bench/decode.py --dry-run            # tiny model on the CPU (no GPU): checks the script
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.qlinear import QuantLinear
from compress.quant import QuantSpec, stored_bytes

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rotate(x, cos, sin):
    """Rotary embedding, HF Llama's half-split convention. x (B, H, T, D); cos, sin (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.h, self.kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = d // self.h
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)
        self.k_cache = self.v_cache = None

    def forward(self, x, pos, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # Static cache (B, KV, L, D) written at the positions: shapes never change, so a CUDA graph
        # captures the step.
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        keys, values = self.k_cache, self.v_cache
        if self.kv != self.h:
            keys = keys.repeat_interleave(self.h // self.kv, dim=1)
            values = values.repeat_interleave(self.h // self.kv, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, pos, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), pos, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama decoder with HF's module names (model.layers.N.self_attn.q_proj, ...)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def allocate_cache(self, max_len: int) -> None:
        """Static KV cache of max_len positions, and the rotary tables for them."""
        cfg, p = self.cfg, self.lm_head.weight
        hd = cfg.hidden_size // cfg.num_attention_heads
        for layer in self.layers:
            shape = (1, cfg.num_key_value_heads, max_len, hd)
            layer.self_attn.k_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
        theta = getattr(cfg, "rope_theta", 10000.0)
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=p.device).float() / hd)
        ang = torch.outer(torch.arange(max_len, device=p.device).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.cos, self.sin = ang.cos().to(p.dtype), ang.sin().to(p.dtype)
        self.positions = torch.arange(max_len, device=p.device)

    def forward(self, ids, pos):
        """ids (1, T) int64 at positions pos (T,) -> logits of the last position (1, V)."""
        x = self.embed_tokens(ids)
        cos, sin = self.cos[pos], self.sin[pos]
        mask = self.positions[None, :] <= pos[:, None]  # (T, L): causal over the static cache
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        return self.lm_head(self.norm(x[:, -1]))


def build_model(cfg, device) -> Llama:
    with torch.device(device):
        model = Llama(cfg).to(torch.float16)
    for p in model.parameters():  # small weights keep fp16 activations finite through 32 layers
        p.data.normal_(0.0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    return model.eval()


def plans(n_layers: int) -> dict:
    """Variant name -> {linear name: QuantSpec or None (fp16)}."""
    int4, int8 = QuantSpec(4, 128, False), QuantSpec(8)
    names = [f"layers.{i}.{lin}" for i in range(n_layers) for lin in LINEARS]
    keep8 = {0, 1, n_layers - 2, n_layers - 1}
    mixed = {nm: int8 if int(nm.split(".")[1]) in keep8 or nm.endswith("down_proj") else int4 for nm in names}
    return {"fp16": {nm: None for nm in names}, "int4-g128": {nm: int4 for nm in names},
            "int8": {nm: int8 for nm in names}, "mixed": mixed}


def apply_plan(model: Llama, plan: dict) -> dict:
    """Swap the planned linears for QuantLinear, layer by layer; returns the fp16 modules to restore."""
    originals = {}
    for name, spec in plan.items():
        if spec is None:
            continue
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, attr)
        originals[name] = lin
        setattr(parent, attr, QuantLinear.from_linear(lin, spec, name))
    return originals


def restore(model: Llama, originals: dict) -> None:
    for name, lin in originals.items():
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, lin)


def weight_bytes(model: Llama) -> int:
    """Bytes of all weights read per decoded token (embedding: one row)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.weight_bytes()
        elif isinstance(mod, (nn.Linear, RMSNorm)):
            total += mod.weight.numel() * mod.weight.element_size()
    return total + model.cfg.hidden_size * 2


def average_bits(plan: dict, model: Llama) -> float:
    bits = weights = 0
    for name, spec in plan.items():
        lin = model.get_submodule(name)
        n, k = lin.out_features, lin.in_features
        bits += 8 * (stored_bytes(spec, n, k) if spec else 2 * n * k)
        weights += n * k
    return bits / weights


class Timer:
    """CUDA events on the GPU, wall clock on the CPU (dry run)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t) * 1e3


def measure(model: Llama, prompt: int, new_tokens: int, prefill_lens: list[int], graphs: bool, device) -> dict:
    """Prefill ms for each prompt length, then tokens/s of greedy decode after a `prompt` prompt."""
    out = {"prefill_ms": {}}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for p in prefill_lens:
        model.allocate_cache(p)
        ids = torch.randint(0, model.cfg.vocab_size, (1, p), generator=gen).to(device)
        pos = torch.arange(p, device=device)
        model(ids, pos)  # autotunes / compiles the kernels for M = p
        with Timer(device) as t:
            model(ids, pos)
        out["prefill_ms"][p] = t.ms

    warm = 3
    model.allocate_cache(prompt + 2 * (new_tokens + warm) + 1)
    ids = torch.randint(0, model.cfg.vocab_size, (1, prompt), generator=gen).to(device)
    tok = model(ids, torch.arange(prompt, device=device)).argmax(-1).view(1, 1)
    pos = torch.tensor([prompt], device=device)

    def step():
        nxt = model(tok, pos).argmax(-1)
        tok.copy_(nxt.view(1, 1))
        pos.add_(1)

    side = torch.cuda.Stream() if graphs else None
    with torch.cuda.stream(side) if graphs else _null():
        for _ in range(warm):  # autotunes M = 1 and allocates split-K counters on this stream
            step()
    eager_steps = min(new_tokens, 32)
    with Timer(device) as t:
        for _ in range(eager_steps):
            step()
    out["eager_tokens_per_s"] = eager_steps / (t.ms * 1e-3)
    if graphs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            step()
        with Timer(device) as t:
            for _ in range(new_tokens):
                graph.replay()
        out["graph_tokens_per_s"] = new_tokens / (t.ms * 1e-3)
    out["tokens_per_s"] = out.get("graph_tokens_per_s", out["eager_tokens_per_s"])
    out["final_position"] = int(pos.item())
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def copy_bandwidth(device) -> float:
    n = 1 << 29 if torch.device(device).type == "cuda" else 1 << 20
    src = torch.empty(n, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    with Timer(device) as t:
        for _ in range(10):
            dst.copy_(src)
    return 10 * 2 * n * 2 / (t.ms * 1e-3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128, help="prompt length before decoding")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", default="128,2048", help="comma-separated prompt lengths to time prefill")
    ap.add_argument("--variants", default="fp16,int4-g128,int8,mixed")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (default: the config's)")
    ap.add_argument("--no-graph", action="store_true", help="eager decode only")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, no GPU needed")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/decode.json)")
    args = ap.parse_args(argv)
    from transformers import LlamaConfig

    if args.dry_run:
        device, graphs = "cpu", False
        cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128)
        args.prompt, args.new_tokens, args.prefill = 8, 4, "8"
        out_path = Path(args.out or "/tmp/compress_decode_dry_run.json")
    elif torch.cuda.is_available():
        device, graphs = "cuda", not args.no_graph
        cfg = LlamaConfig()  # Llama-2-7B: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000
        out_path = Path(args.out or "bench/results/decode.json")
    else:
        print("bench/decode.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    if args.layers:
        cfg.num_hidden_layers = args.layers
    if cfg.num_key_value_heads is None:
        cfg.num_key_value_heads = cfg.num_attention_heads

    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    t0 = time.perf_counter()
    model = build_model(cfg, device)
    info = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU dry run)",
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "vocab_size")},
            "copy_bandwidth_TBps": bw / 1e12, "prompt": args.prompt, "new_tokens": args.new_tokens,
            "cuda_graphs": graphs, "build_s": time.perf_counter() - t0, "variants": {}}
    print(f"# {info['gpu']}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; prompt {args.prompt}, {args.new_tokens} new tokens, graphs={graphs}", flush=True)
    prefill_lens = [int(v) for v in args.prefill.split(",") if v]
    all_plans = plans(cfg.num_hidden_layers)
    hd = cfg.hidden_size // cfg.num_attention_heads
    for name in args.variants.split(","):
        plan = all_plans[name]
        t0 = time.perf_counter()
        with torch.inference_mode():
            originals = apply_plan(model, plan)
            quant_s = time.perf_counter() - t0
            res = measure(model, args.prompt, args.new_tokens, prefill_lens, graphs, device)
        # KV bytes read per token: the attention reads the whole static cache of this run.
        kv_len = args.prompt + 2 * (args.new_tokens + 3) + 1
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * kv_len * hd * 2
        per_token = weight_bytes(model) + kv_bytes
        res.update(avg_bits=average_bits(plan, model), quantize_s=quant_s, bytes_per_token=per_token,
                   bandwidth_share=per_token * res["tokens_per_s"] / bw)
        info["variants"][name] = res
        restore(model, originals)
        del originals
        if device == "cuda":
            torch.cuda.empty_cache()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(info, indent=1))  # after each variant: a timeout keeps the rest
        pre = " ".join(f"prefill {p}: {ms:.1f} ms" for p, ms in res["prefill_ms"].items())
        print(f"{name:>10}: {res['avg_bits']:5.2f} bits  {res['tokens_per_s']:8.1f} tok/s "
              f"(eager {res['eager_tokens_per_s']:.1f})  {res['bandwidth_share'] * 100:4.0f}% of bandwidth  {pre}",
              flush=True)
    base = info["variants"].get("fp16")
    if base:
        for name, res in info["variants"].items():
            res["speedup_vs_fp16"] = res["tokens_per_s"] / base["tokens_per_s"]
        print("# decode speed-up over fp16: " + ", ".join(
            f"{n} {r['speedup_vs_fp16']:.2f}x" for n, r in info["variants"].items()))
    out_path.write_text(json.dumps(info, indent=1))
    print(f"# wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
