"""The CLI's habits (issue 15 item 2): refusals, interrupts, full disks, strict JSON, --version,
--device, a verified inspect, help texts, install hints, and README's tour run as written.

Bad input: exit 2, one line on stderr, nothing left behind (no hidden .NAME.tmp-* or .NAME.old-*).
"""
import errno
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import compress.api as api
from compress import atomic
from compress.cli import _write_json, build_parser, main, to_strict_json
from compress.errors import CompressError, DiskFullError, Interrupted, install_hint
from compress.safetensors_io import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar
MODEL_COMMANDS = ("plan", "apply", "eval", "analyze", "export", "head", "predict")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def shown_lines(err: str) -> list[str]:
    """stderr's lines as a terminal leaves them, progress bars (carriage returns, tqdm) dropped."""
    shown = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]
    return [line for line in shown if line.strip() and not PROGRESS.search(line)]


def assert_one_line_error(code, err, *needles):
    """Exit 2 and one line besides progress bars."""
    assert code == 2, err
    lines = shown_lines(err)
    assert len(lines) == 1 and lines[0].startswith("compress: error:") and err.endswith("\n"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def hidden(directory: Path) -> list[str]:
    """Hidden entries (temporary or set-aside outputs) in a directory."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


def tree(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def strict_load(path: Path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def int8_plan(tiny_bert_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "int8.json"
    assert main(["plan", str(tiny_bert_dir), "--bits", "8", "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def compressed(tiny_bert_dir, int8_plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("compressed") / "int8"
    assert main(["apply", str(tiny_bert_dir), "--plan", str(int8_plan), "-o", str(out)]) == 0
    return out


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(f"sentence number {i} about topic {i % 7}" for i in range(40)) + "\n")
    return path


# ---- refusing to overwrite -------------------------------------------------------------------

def test_plan_refuses_to_overwrite_without_flag(tiny_bert_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("keep me\n")
    code, _, err = run(capsys, "plan", tiny_bert_dir, "--bits", "8", "-o", plan)
    assert_one_line_error(code, err, f"{plan} exists; pass --overwrite")
    assert plan.read_text() == "keep me\n" and hidden(tmp_path) == []
    code, _, _ = run(capsys, "plan", tiny_bert_dir, "--bits", "8", "-o", plan, "--overwrite")
    assert code == 0 and strict_load(plan)["format"] == "compress.plan" and hidden(tmp_path) == []


def test_apply_overwrite_never_replaces_a_regular_file(tiny_bert_dir, int8_plan, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file, not a model\n")
    code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", int8_plan, "-o", out)
    assert_one_line_error(code, err, f"output {out} is a file, not a directory")
    code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", int8_plan, "-o", out, "--overwrite")
    assert_one_line_error(code, err, f"output {out} is a file, not a directory")
    assert out.read_text() == "a file, not a model\n" and hidden(tmp_path) == []


def test_atomic_directory_refusals(tmp_path, monkeypatch):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(CompressError, match="has no compress.json, so compress did not write it"):
        with atomic.atomic_directory(foreign, marker="compress.json"):
            pytest.fail("entered")
    monkeypatch.chdir(foreign)
    for here in (Path("."), Path(".."), foreign):
        with pytest.raises(CompressError, match="current directory or one above it"):
            atomic.check_output_dir(here, overwrite=True)
    assert tree(foreign) == {"cat.jpg": 2} and hidden(tmp_path) == []


def test_atomic_directory_replaces_and_cleans_up(tmp_path):
    out = tmp_path / "model"
    with atomic.atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with atomic.atomic_directory(out, marker="a") as tmp:
        (tmp / "a").write_text("2")
    assert (out / "a").read_text() == "2" and hidden(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(out) as tmp:
            (tmp / "a").write_text("3")
            raise KeyboardInterrupt
    assert (out / "a").read_text() == "2" and hidden(tmp_path) == []


def test_interrupt_between_the_two_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "a").write_text("old")
    rename = Path.rename

    def interrupted_rename(self, target):
        if ".tmp-" in self.name:  # the second rename: the new output into place
            raise Interrupted(signal.SIGTERM)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_rename)
    with pytest.raises(Interrupted):
        with atomic.atomic_directory(out) as tmp:
            (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "old" and hidden(tmp_path) == []


# ---- full disk -------------------------------------------------------------------------------

def _fill_disk(monkeypatch):
    """Make every module's write_safetensors write a little, then fail as a full disk does."""
    def full(path, tensors, metadata):
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    patched = [name for name, m in list(sys.modules.items()) if name.startswith("compress")
               and getattr(m, "write_safetensors", None) is write_safetensors]
    for name in patched:
        monkeypatch.setattr(sys.modules[name], "write_safetensors", full)
    assert patched, "no module writes through compress.safetensors_io.write_safetensors"


def test_full_disk_is_one_line_and_leaves_nothing(tiny_bert_dir, int8_plan, compressed, tmp_path, capsys,
                                                 monkeypatch):
    _fill_disk(monkeypatch)
    out = tmp_path / "new"
    code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", int8_plan, "-o", out)
    assert_one_line_error(code, err, f"no space left on device writing {out}", "bytes", "free")
    assert not out.exists() and hidden(tmp_path) == []
    existing = tmp_path / "existing"
    shutil.copytree(compressed, existing)
    before = tree(existing)
    code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", int8_plan, "-o", existing, "--overwrite")
    assert_one_line_error(code, err, "no space left on device", "nothing was replaced")
    assert tree(existing) == before and hidden(tmp_path) == []


def test_disk_full_message_names_bytes(tmp_path):
    out = tmp_path / "plan.json"
    with pytest.raises(DiskFullError, match=r"writing .*plan.json: it needs more than the 5 bytes it had written, "
                                            r"[\d,]+ bytes were free"):
        with atomic.atomic_directory(out) as tmp:
            (tmp / "x").write_bytes(b"12345")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(DiskFullError, match="needs 1,000 bytes"):
        with atomic.atomic_directory(out, expected_bytes=1000):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert hidden(tmp_path) == [] and not out.exists()


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


def test_full_tmpfs(tiny_bert_dir, int8_plan, compressed, tmp_path, capsys):
    """A real full disk: a tmpfs one compressed model fits on, but not two (the overwrite's copy)."""
    need = sum(tree(compressed).values())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, need + 256 * 1024):
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs)")
    try:
        out = disk / "model"
        code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", int8_plan, "-o", out)
        assert code == 0, err
        before = tree(out)
        code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", int8_plan, "-o", out, "--overwrite")
        assert_one_line_error(code, err, f"no space left on device writing {out}", "bytes were free")
        assert sorted(p.name for p in disk.iterdir()) == ["model"] and tree(out) == before
        shutil.rmtree(out)
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
        code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", int8_plan, "-o", out)
        assert_one_line_error(code, err, "no space left on device")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---- interrupts ------------------------------------------------------------------------------

def _signal_when_written(parent: Path, name: str, sig: int, marker: str, timeout: float = 120) -> threading.Thread:
    """Send ``sig`` to this process once a complete temporary output .NAME.tmp-* holds ``marker``
    (the writer is then paused by COMPRESS_TEST_PAUSE_WRITE) and main's handler is installed."""
    def wait_and_signal():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [p for p in parent.glob(f".{name}.tmp-*") if (p / marker).exists() or p.is_file()]
            if ready and callable(signal.getsignal(sig)) and signal.getsignal(sig) is not signal.default_int_handler:
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=wait_and_signal, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_writing_in_process(tiny_bert_dir, int8_plan, tmp_path, capsys, monkeypatch, sig):
    monkeypatch.setenv(atomic.PAUSE_ENV, "30")
    out = tmp_path / "model"
    thread = _signal_when_written(tmp_path, "model", sig, "compress.json")
    start = time.monotonic()
    code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", int8_plan, "-o", out)
    thread.join(5)
    assert code == 128 + sig and time.monotonic() - start < 30
    assert shown_lines(err) == [f"compress: interrupted ({signal.Signals(sig).name}); unfinished output removed"]
    assert not out.exists() and hidden(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main restored the handlers
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_while_writing_a_plan(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(atomic.PAUSE_ENV, "30")
    thread = _signal_when_written(tmp_path, "plan.json", signal.SIGTERM, "")
    code, _, err = run(capsys, "plan", tiny_bert_dir, "--bits", "8", "-o", tmp_path / "plan.json")
    thread.join(5)
    assert code == 143 and shown_lines(err) == ["compress: interrupted (SIGTERM); unfinished output removed"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_to_a_compress_process(tiny_bert_dir, int8_plan, tmp_path):
    """The issue's case: `kill PID` of a running `compress apply` while it writes."""
    out = tmp_path / "model"
    env = {**os.environ, atomic.PAUSE_ENV: "60", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "apply", str(tiny_bert_dir), "--plan",
                             str(int8_plan), "-o", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not any((p / "compress.json").exists() for p in tmp_path.glob(".model.tmp-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the temporary output never appeared"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert shown_lines(err) == ["compress: interrupted (SIGTERM); unfinished output removed"], err
    assert not out.exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("command,function", [("plan", "plan"), ("eval", "evaluate"), ("inspect", "inspect")])
def test_ctrl_c_anywhere_is_one_line(tiny_bert_dir, compressed, tmp_path, capsys, monkeypatch, command, function):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, function, interrupted)
    argv = {"plan": ["plan", tiny_bert_dir, "--bits", "8", "-o", tmp_path / "p.json"],
            "eval": ["eval", compressed], "inspect": ["inspect", compressed]}[command]
    code, _, err = run(capsys, *argv)
    assert code == 130 and shown_lines(err) == ["compress: interrupted (SIGINT); unfinished output removed"]


# ---- --version, --device ---------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"compress {importlib.metadata.version('compress')}\n"


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


def test_device_on_every_command_that_runs_a_model(tiny_bert_dir, compressed, tmp_path, capsys, monkeypatch):
    _, commands = _subparsers()
    for name in MODEL_COMMANDS:
        assert "--device" in commands[name]._option_string_actions, name
    for function in ("plan", "apply", "evaluate", "analyze", "export", "fit_head", "predict"):
        assert "device" in inspect.signature(getattr(api, function)).parameters, function

    def record(*args, **kwargs):
        raise CompressError(f"device={kwargs.get('device')}")

    argv = {"plan": ["plan", tiny_bert_dir, "--bits", "8", "-o", tmp_path / "p.json"],
            "apply": ["apply", tiny_bert_dir, "--plan", tmp_path / "p.json", "-o", tmp_path / "o"],
            "evaluate": ["eval", compressed], "analyze": ["analyze", tiny_bert_dir],
            "export": ["export", compressed, "-o", tmp_path / "m.onnx"],
            "fit_head": ["head", compressed, "--labels", tmp_path / "l.jsonl"],
            "predict": ["predict", compressed, "some text"]}
    for function, args in argv.items():
        monkeypatch.setattr(api, function, record)
        code, _, err = run(capsys, *args, "--device", "cpu")
        assert_one_line_error(code, err, "device=cpu")


def test_bad_device_is_one_line(compressed, tiny_bert_dir, tmp_path, capsys):
    code, _, err = run(capsys, "eval", compressed, "--device", "gpu")
    assert_one_line_error(code, err, "device 'gpu' is not a torch device name")
    code, _, err = run(capsys, "plan", tiny_bert_dir, "--method", "fisher", "-o", tmp_path / "p.json",
                       "--device", "meta")
    assert_one_line_error(code, err, "device meta holds no data")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "predict", compressed, "text", "--device", "cuda:0")
        assert_one_line_error(code, err, "device cuda:0: no cuda device is available")
    code, _, err = run(capsys, "export", compressed, "-o", tmp_path / "m.onnx", "--device", "cuda")
    assert code == 2 and ("export runs on the CPU" in err or "no cuda device" in err)
    assert not (tmp_path / "p.json").exists()


def test_eval_on_a_device_matches(compressed, texts, tmp_path, capsys):
    """--device cpu goes through the device path (model moved, inputs in, outputs back) and
    gives exactly the figures of the default path."""
    code, _, err = run(capsys, "eval", compressed, "--data", texts, "--json", tmp_path / "a.json")
    assert code == 0, err
    code, _, err = run(capsys, "eval", compressed, "--data", texts, "--json", tmp_path / "b.json", "--device", "cpu")
    assert code == 0, err
    a, b = strict_load(tmp_path / "a.json"), strict_load(tmp_path / "b.json")
    assert a["quality"] == b["quality"] and a["quality"]["texts"] == 40


def test_check_device():
    assert api.check_device(None) is None
    assert api.check_device("cpu") == torch.device("cpu")
    with pytest.raises(CompressError, match="not a torch device name"):
        api.check_device("cuda:x")


# ---- strict JSON -----------------------------------------------------------------------------

def test_strict_json_turns_nan_and_inf_into_null(tmp_path, capsys):
    obj = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": (1, 2), "p": Path("x"),
           "t": torch.tensor([1.0, float("nan")]), "n": {"deep": [{"x": float("nan")}]}, "ok": True, "none": None}
    assert to_strict_json(obj) == {"a": None, "b": [None, None, 1.5], "c": [1, 2], "p": "x", "t": [1.0, None],
                                   "n": {"deep": [{"x": None}]}, "ok": True, "none": None}
    _write_json(obj, str(tmp_path / "r.json"))
    assert strict_load(tmp_path / "r.json")["a"] is None and hidden(tmp_path) == []


def test_eval_json_and_table_with_a_missing_figure(compressed, tmp_path, capsys, monkeypatch):
    def evaluate(*args, **kwargs):
        return {"model": str(compressed), "reference": "ref", "kind": "encoder",
                "quality": {"mean_cosine": 0.99, "neighbour_overlap@10": float("nan")},
                "size": {"total_bytes": 10, "quantized_layers": 0, "avg_bits_quantized": float("nan")},
                "reference_size": {"total_bytes": 20}}

    monkeypatch.setattr(api, "evaluate", evaluate)
    code, out, _ = run(capsys, "eval", compressed, "--json", tmp_path / "report.json")
    assert code == 0 and re.search(r"avg bits \(quantized layers\)\s+n/a", out)
    report = strict_load(tmp_path / "report.json")
    assert report["size"]["avg_bits_quantized"] is None and report["quality"]["neighbour_overlap@10"] is None


# ---- inspect ---------------------------------------------------------------------------------

def test_inspect_prints_totals_and_verifies(compressed, tmp_path, capsys):
    code, out, _ = run(capsys, "inspect", compressed, "--json", tmp_path / "i.json")
    assert code == 0
    assert "quantized layers: 12 (int8: 12 layers, " in out and "verified: " in out and "total (" in out
    info = strict_load(tmp_path / "i.json")
    assert info["totals"]["quantized_layers"] == 12
    assert info["totals"]["file_bytes"] == sum(tree(compressed).values())
    assert info["totals"]["tensor_bytes"] < info["totals"]["file_bytes"]


def _copy(compressed, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(compressed, copy)
    return copy


def test_inspect_refuses_a_truncated_model(compressed, tmp_path, capsys):
    copy = _copy(compressed, tmp_path)
    weights = copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    code, _, err = run(capsys, "inspect", copy)
    assert_one_line_error(code, err, "model.safetensors is truncated")
    weights.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    code, _, err = run(capsys, "inspect", copy)
    assert_one_line_error(code, err, "model.safetensors is truncated or corrupted")


def _safetensors(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize("header,message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12"),
    ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype Q9"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "spans bytes 8-0"),
    ({"a": {"dtype": "F32", "shape": "two", "data_offsets": [0, 8]}}, "malformed safetensors header"),
    ({"a": [1, 2]}, "malformed safetensors header"),
])
def test_inspect_checks_every_byte_range(compressed, tmp_path, capsys, header, message):
    copy = _copy(compressed, tmp_path)
    _safetensors(copy / "extra.safetensors", header, b"\0" * 16)
    code, _, err = run(capsys, "inspect", copy)
    assert_one_line_error(code, err, "extra.safetensors", message)


def test_inspect_refuses_a_missing_layer_and_a_bad_config(compressed, tmp_path, capsys):
    copy = _copy(compressed, tmp_path)
    meta = json.loads((copy / "compress.json").read_text())
    meta["layers"]["encoder.layer.7.output.dense"] = dict(next(iter(meta["layers"].values())))
    (copy / "compress.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "inspect", copy)
    assert_one_line_error(code, err, "layer encoder.layer.7.output.dense listed in compress.json has no tensors")
    (copy / "config.json").write_text("{not json")
    code, _, err = run(capsys, "inspect", copy)
    assert_one_line_error(code, err, "config.json is not valid JSON")


# ---- help texts and install hints ------------------------------------------------------------

def test_every_help_entry_explains_itself():
    parser, commands = _subparsers()
    for name, p in [("compress", parser), *commands.items()]:
        for action in p._actions:
            assert action.help and action.help.strip() and action.help != argparse_suppress(), \
                f"{name} {action.option_strings or action.dest} has no help"
    assert set(commands) >= {"plan", "apply", "eval", "inspect", "analyze", "export", "head", "predict"}


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def test_install_hints_never_name_the_unrelated_pypi_compress():
    """pip's "compress" extras would fetch another project (the index's compress) instead."""
    bad = re.compile(r"""pip install\s+["']?compress\[""")
    files = [*ROOT.glob("compress/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("bench/*.sh"), ROOT / "tests" / "conftest.py", ROOT / "README.md", ROOT / "bench" / "README.md"]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert offenders == []
    hint = install_hint("onnx", "onnx onnxruntime onnxscript")
    assert hint.startswith("pip install onnx onnxruntime onnxscript")
    assert f'pip install "{ROOT}[onnx]"' in hint  # this checkout is a source tree


# ---- README's tour, in order as written ------------------------------------------------------

def tour_commands() -> list[list[str]]:
    """The command lines of README's "A short tour" block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## A short tour"):]
    block = block[block.index("```bash\n") + 8:]
    block = block[:block.index("```")]
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("compress ")]


def test_tour_outputs_are_not_reused():
    written = [argv[argv.index("-o") + 1] for argv in tour_commands() if "-o" in argv]
    assert len(written) == len(set(written)), written
    assert len(tour_commands()) >= 12


# What the tour test adds to a line to keep it short: fewer calibration / evaluation texts, fewer
# head units (still more than predict's 20). Everything else runs as written.
FEWER = {"plan --method": ["--samples", "8"], "analyze": ["--samples", "8"], "eval": ["--samples", "64"],
         "head": ["--units", "20"]}


@pytest.mark.slow
def test_readme_tour_runs_in_order(tiny_bert_dir, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """Every tour line, in order, in one directory, with minilm and MODEL_DIR as tiny local models."""
    monkeypatch.chdir(tmp_path)
    Path("calib.txt").write_text("\n".join(f"Once upon a time there was a story number {i}. It was about a "
                                           f"cat, a dog and the number {i * 7}." for i in range(64)) + "\n")
    Path("train.jsonl").write_text("".join(json.dumps({"text": f"{w} text {i}", "label": w})
                                           + "\n" for i in range(30) for w in ("good", "bad")))
    names = {"minilm": str(tiny_bert_dir), "MODEL_DIR": str(tiny_llama_dir)}
    has_onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
    for argv in tour_commands():
        argv = [names.get(a, a) for a in argv]
        if argv[0] == "export" and not has_onnx:
            continue
        argv += FEWER.get(argv[0] if "--method" not in argv else "plan --method", [])
        start = time.monotonic()
        code, out, err = run(capsys, *argv)
        assert code == 0, f"compress {shlex.join(argv)} exited {code}: {err[-2000:]}"
        print(f"{time.monotonic() - start:6.1f} s  compress {argv[0]}", file=sys.__stderr__)
    assert strict_load("report.json")["kind"] == "encoder"
    assert "verified: " in run(capsys, "inspect", "minilm-oracle5")[1]
    assert hidden(tmp_path) == []
