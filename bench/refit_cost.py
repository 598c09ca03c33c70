"""What the scale refit (compress.refit) costs next to the GPTQ pass it follows, and what it gains on
GPTQ's objective, on random layers of a few shapes (1 CPU thread).

    python bench/refit_cost.py [--shapes 384x1536,1536x384,4096x4096] [--out refit-cost-cpu]

H comes from 2K random inputs with uneven per-column scales (as activations have); the objective is
tr(ΔW H ΔWᵀ). Results: bench/results/<out>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _common import cpu_name, save_results  # noqa: E402

from compress.gptq import gptq_quantize, output_error  # noqa: E402
from compress.quant import QuantSpec  # noqa: E402
from compress.refit import refit_scales  # noqa: E402

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="384x1536,1536x384,4096x4096", help="N x K of the layers")
    ap.add_argument("--out", default="refit-cost-cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g)
        x = torch.randn(2 * k, k, generator=g) * torch.rand(k, generator=g) * 3
        H = x.T @ x / x.shape[0]
        for spec in (QuantSpec(4, 32, False), QuantSpec(4, 128, False), QuantSpec(8)):
            t = time.perf_counter()
            qw = gptq_quantize(w, H, spec, act_order=True)
            gptq_s = time.perf_counter() - t
            t = time.perf_counter()
            fit = refit_scales(w, qw, H)
            refit_s = time.perf_counter() - t
            e0, e1 = output_error(w, qw, H), output_error(w, fit, H)
            rows.append({"N x K": shape, "scheme": f"int{spec.bits}" + (f" g{spec.group_size}" if spec.bits == 4 else ""),
                         "gptq_s": round(gptq_s, 2), "refit_s": round(refit_s, 2),
                         "refit / gptq time": round(refit_s / gptq_s, 2), "objective after / before": round(e1 / e0, 4)})
            print(rows[-1], flush=True)
    header = (f"Scale refit vs GPTQ (act-order), {date.today()}, CPU: {cpu_name()} (1 thread; load "
              f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, command: python bench/refit_cost.py "
              f"{' '.join(sys.argv[1:])}".rstrip())
    cols = ["N x K", "scheme", "gptq_s", "refit_s", "refit / gptq time", "objective after / before"]
    print(save_results(args.out, header, rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
