"""GPTQ's held-out output error against its damping on i.i.d. Gaussian inputs (a caveat to token damping).

compress.gptq.layer_damp raises a layer's damping where its calibration tokens are few for its
width (n small next to K): measured better end to end on MiniLM (bench/peers.py). This script shows
where that reasoning does *not* carry: with independent Gaussian token rows, anisotropic through a
fixed random mix, a layer's output error on fresh rows of the same distribution, after GPTQ on n
calibration rows, relative to damp 0.01.

    python bench/damp_synthetic.py            # writes bench/results/damp-synthetic-cpu.{json,md}
"""
from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import torch

from compress.gptq import HessianAccumulator, gptq_quantize, output_error
from compress.quant import QuantSpec

from _common import cpu_name, markdown_table  # noqa: E402  (bench/ is the script's directory)

DAMPS = (0.01, 0.03, 0.1, 0.3, 1.0)
CASES = ((128, 192), (128, 640), (128, 2560), (384, 6734))  # (K, n calibration rows)


def held_out_ratios(k: int, n: int, decay: float, seed: int = 0) -> list[float]:
    """Held-out tr(ΔW H ΔWᵀ) at each of DAMPS over its value at 0.01: W (32, k) Gaussian, inputs
    z @ M with z ~ N(0, I) (rows i.i.d.) and M (k, k) Gaussian with column scales 10^(-decay · j/k)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 * torch.logspace(0, -decay, k).unsqueeze(0)
    w = torch.randn(32, k, generator=g)
    calib, held = HessianAccumulator(k), HessianAccumulator(k)
    calib.add(torch.randn(n, k, generator=g) @ mix)
    held.add(torch.randn(8192, k, generator=g) @ mix)
    errs = [output_error(w, gptq_quantize(w, calib.hessian, QuantSpec(4, 32, False), damp=d, act_order=True),
                         held.hessian) for d in DAMPS]
    return [e / errs[0] for e in errs]


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    for k, n in CASES:
        for decay in (0.0, 1.0, 2.0):
            r = held_out_ratios(k, n, decay)
            rows.append({"K": k, "n": n, "n/K": round(n / k, 2), "decay": decay,
                         **{f"damp {d:g}": round(x, 3) for d, x in zip(DAMPS, r)}})
            print(rows[-1], flush=True)
    header = (f"GPTQ held-out output error vs damping on i.i.d. Gaussian inputs (ratio to damp 0.01), {date.today()}, "
              f"CPU: {cpu_name()}, torch {torch.__version__}, command: python bench/damp_synthetic.py")
    out = Path(__file__).parent / "results" / "damp-synthetic-cpu"
    out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown_table(rows, list(rows[0]), header) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
