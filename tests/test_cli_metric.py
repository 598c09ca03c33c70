"""The causal-LM damage measure (issue 15 item 3) and interrupts before the CLI is imported.

kl is the default everywhere the analyzers run (analyze, plan, the oracle); `--metric` chooses on
analyze and plan; `analyze --eval-data` gives the oracle its own text. A SIGINT or SIGTERM while
`python -m compress` is still importing torch prints one line and exits 130 / 143.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.analyze import analyze
from compress.analyze.base import CAUSAL_METRICS, DEFAULT_CAUSAL_METRIC, AnalyzerConfig
from compress.cli import build_parser, main
from compress.data import default_corpus, load_texts
from compress.errors import CompressError
from compress.models import load_model

ROOT = Path(__file__).resolve().parents[1]
INTERRUPTED = "compress: interrupted ({}); unfinished output removed"


def _option(command: str, flag: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if flag in a.option_strings)


# ---- the default ------------------------------------------------------------------------------------

def test_kl_is_the_one_default():
    assert DEFAULT_CAUSAL_METRIC == "kl" and AnalyzerConfig().causal_metric == DEFAULT_CAUSAL_METRIC
    for command in ("analyze", "plan"):
        action = _option(command, "--metric")
        # None: the analyzers' config decides, so the CLI cannot drift from DEFAULT_CAUSAL_METRIC.
        assert action.default is None and set(action.choices) == set(CAUSAL_METRICS)
        assert f"{DEFAULT_CAUSAL_METRIC} (KL from the unmodified model's next-token distributions, the default" \
            in action.help
        assert "float32" in action.help and "128k vocabulary" in action.help  # the memory bound, said
    assert "oracle" in _option("analyze", "--eval-data").help


def test_bad_metric(tiny_llama_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(tiny_llama_dir), "--metric", "mse"])
    assert e.value.code == 2 and "invalid choice: 'mse'" in capsys.readouterr().err
    with pytest.raises(CompressError, match=r"causal_metric 'mse' is not one of \('nll', 'kl'\)"):
        AnalyzerConfig(causal_metric="mse")


# ---- --metric on plan and analyze, --eval-data ------------------------------------------------------

@pytest.mark.parametrize("given,recorded", [(None, "mean_kl"), ("nll", "mean_nll"), ("kl", "mean_kl")])
def test_plan_metric(tiny_llama_dir, tmp_path, capsys, given, recorded):
    out = tmp_path / "plan.json"
    argv = ["plan", str(tiny_llama_dir), "--method", "fisher", "--granularity", "module", "--samples", "4",
            "--budget", "6", "-o", str(out)] + (["--metric", given] if given else [])
    assert main(argv) == 0, capsys.readouterr().err
    sens = json.loads(out.read_text())["sensitivity"]
    assert sens["provenance"]["metric"] == recorded
    assert sens["provenance"]["config"]["causal_metric"] == (given or DEFAULT_CAUSAL_METRIC)


def test_analyze_metric_and_eval_data(tiny_llama_dir, tmp_path, capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(default_corpus()[200:260]) + "\n")
    rows = {}
    for metric in (None, "nll"):
        out = tmp_path / f"rows-{metric}.json"
        argv = ["analyze", str(tiny_llama_dir), "--methods", "fisher", "--samples", "4", "--eval-data",
                str(held_out), "--json", str(out)] + (["--metric", metric] if metric else [])
        assert main(argv) == 0, capsys.readouterr().err
        rows[metric] = {r["method"]: r["sensitivity"] for r in json.loads(out.read_text())["rows"]}
    # Both the oracle and the analyzer measure with the metric asked; kl when none is.
    assert {s["provenance"]["metric"] for s in rows[None].values()} == {"mean_kl"}
    assert {s["provenance"]["metric"] for s in rows["nll"].values()} == {"mean_nll"}
    # The oracle measured on the held-out text, not on the analyzers' calibration text.
    lm = load_model(tiny_llama_dir)
    on_held_out = analyze(lm, "oracle", load_texts(held_out), samples=4, progress=False)
    on_calib = analyze(lm, "oracle", load_texts(None), samples=4, progress=False)
    assert rows[None]["oracle"]["scores"] == pytest.approx(on_held_out.scores, rel=1e-6)
    assert rows[None]["oracle"]["scores"] != pytest.approx(on_calib.scores, rel=1e-3)
    assert rows[None]["oracle"]["provenance"]["reference_metric"] == 0.0  # KL of the unmodified model to itself


def test_kl_chunks_add_up_as_one_batch(tiny_llama_dir):
    """The kl metric sums a batch a few positions at a time (bounded float64 temporaries): the same
    value as the whole batch at once."""
    import torch
    import torch.nn.functional as F

    from compress.analyze.base import build_units, make_config
    from compress.analyze.calib import Calibration

    lm = load_model(tiny_llama_dir)
    config = make_config("oracle", samples=4, seq_len=200, batch_size=4, progress=False)  # 800 > one chunk's rows
    calib = Calibration(lm, load_texts(None), config, build_units(lm.model, "block").blocks)
    calib.reference(lm.model)
    with torch.no_grad():
        torch.manual_seed(0)
        ref = calib._ref[0]
        out = ref + 0.05 * torch.randn_like(ref)
    assert (1 << 22) // ref.shape[-1] < ref.shape[0] * ref.shape[1]  # more than one chunk
    lr, lp = F.log_softmax(ref.double(), -1), F.log_softmax(out.double(), -1)
    whole = (lr.exp() * (lr - lp)).sum().item()
    assert calib._batch_metric(out, 0) == pytest.approx(whole, rel=1e-12) and whole > 0


# ---- interrupts while the package is still importing ------------------------------------------------

def _torch_mapped(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc to see the torch import")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_importing_torch(tmp_path, sig):
    """Sent once torch's library is mapped into `python -m compress plan ...` (at least 0.3 s after
    start): the import is under way, inside main, and the command has not finished."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "compress", "plan", str(tmp_path / "no-model"), "--bits", "4",
                             "-o", str(tmp_path / "p.json")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        while not (_torch_mapped(proc.pid) and time.monotonic() - start >= 0.3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - start < 120, "torch was never imported"
            time.sleep(0.005)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    assert proc.returncode == 128 + sig, err
    assert err == INTERRUPTED.format(signal.Signals(sig).name) + "\n" and out == ""
    assert list(tmp_path.iterdir()) == []


def test_import_compress_does_not_import_torch():
    """Why the interrupt test holds: the package loads compress.api (and torch) on first use."""
    code = "import sys, compress; assert 'torch' not in sys.modules; compress.plan; assert 'torch' in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
