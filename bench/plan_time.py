"""Wall and CPU time of the user's pipeline: `compress plan` (priced for GPTQ) then `compress apply`
(GPTQ), each as its own CLI process, as a user runs them; optionally `compress eval` for quality.

    python bench/plan_time.py [--model minilm] [--budget 4.7] [--quantizer-options "--refit 1"]
                              [--eval] [--out plan-time-cpu]

Times come from the child processes' resource usage (user + sys CPU seconds, like /usr/bin/time),
with the machine's load average at the start and end, since this 2-core machine is shared: wall
time under load says little, CPU time is the comparable figure. Results: bench/results/<out>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_name, save_results  # noqa: E402

def timed(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall seconds, CPU seconds (children's user + sys) and last output lines."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": shlex.join(cmd), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_mib": round(after.ru_maxrss / 1024), "stdout": proc.stdout}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--method", default="fisher")
    ap.add_argument("--budget", default="4.7")
    ap.add_argument("--quantizer-options", default="",
                    help="extra `compress plan` options for the quantizer, e.g. \"--mse --refit 1\"")
    ap.add_argument("--eval", action="store_true", help="also run `compress eval` on the result (not timed in the total)")
    ap.add_argument("--out", default="plan-time-cpu")
    args = ap.parse_args()
    exe = [sys.executable, "-m", "compress"]
    rows = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        plan, out = Path(tmp) / "plan.json", Path(tmp) / "model"
        steps = [
            ("plan", exe + ["plan", args.model, "--method", args.method, "--granularity", "module", "--budget",
                            args.budget, "--quantizer", "gptq", *shlex.split(args.quantizer_options), "-o", str(plan)]),
            ("apply", exe + ["apply", args.model, "--plan", str(plan), "-o", str(out)]),
        ]
        for step, cmd in steps:
            r = timed(cmd)
            rows.append({"step": step, **{k: v for k, v in r.items() if k != "stdout"}})
            print(f"{step}: {r['wall_s']} s wall, {r['cpu_s']} s CPU", flush=True)
        rows.append({"step": "plan + apply", "wall_s": round(sum(r["wall_s"] for r in rows), 1),
                     "cpu_s": round(sum(r["cpu_s"] for r in rows), 1)})
        if args.eval:
            r = timed(exe + ["eval", str(out)])
            rows.append({"step": "eval (not in the total)", **{k: v for k, v in r.items() if k != "stdout"},
                         "note": " ".join(line.strip() for line in r["stdout"].splitlines()
                                          if "cos" in line or "kl" in line.lower())})
    load1 = os.getloadavg()[0]
    header = (f"Plan + apply time, {date.today()}, CPU: {cpu_name()} ({os.cpu_count()} cores), load average "
              f"{load0:.2f} at the start, {load1:.2f} at the end; command: python bench/plan_time.py "
              f"{' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip())
    cols = ["step", "wall_s", "cpu_s", "peak_rss_mib", "command", "note"]
    print(save_results(args.out, header, rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
