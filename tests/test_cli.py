"""The CLI: user errors are one line on stderr with exit status 2, and nothing is half-written."""
import json

import pytest

from compress.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_apply_inspect_eval(tiny_bert_dir, tmp_path, capsys):
    plan = tmp_path / "p.json"
    code, out, _ = run(capsys, "plan", tiny_bert_dir, "--bits", "4", "--group-size", "32", "-o", plan)
    assert code == 0 and "padded to whole groups" in out
    code, _, _ = run(capsys, "apply", tiny_bert_dir, "--plan", plan, "-o", tmp_path / "c")
    assert code == 0
    code, out, _ = run(capsys, "inspect", tmp_path / "c")
    assert code == 0 and "encoder.layer.0.attention.self.query" in out and "model.safetensors" in out
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(f"sentence number {i} about topic {i % 7}" for i in range(40)))
    code, out, _ = run(capsys, "eval", tmp_path / "c", "--data", texts, "--json", tmp_path / "r.json")
    assert code == 0 and "mean_cosine" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert 0.5 < res["quality"]["mean_cosine"] <= 1.0 and res["quality"]["texts"] == 40
    assert res["size"]["quantized_layers"] == 12


@pytest.mark.parametrize("argv,msg", [
    (["plan", "{tmp}/missing", "--bits", "8", "-o", "{tmp}/p.json"], "does not exist"),
    (["plan", "{bert}", "--bits", "4", "--profile", "nope", "-o", "{tmp}/p.json"], "unknown profile"),
    (["apply", "{bert}", "--plan", "{tmp}/none.json", "-o", "{tmp}/o"], "plan file"),
    (["inspect", "{tmp}"], "no compress.json"),
])
def test_user_errors_exit_2_one_line(tiny_bert_dir, tmp_path, capsys, argv, msg):
    argv = [a.format(tmp=tmp_path, bert=tiny_bert_dir) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("compress: error:") and msg in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_plan_layer_and_bits(tiny_bert_dir, tmp_path, capsys):
    plan = tmp_path / "p.json"
    run(capsys, "plan", tiny_bert_dir, "--bits", "8", "-o", plan)
    d = json.loads(plan.read_text())
    d["layers"]["encoder.layer.9.output.dense"] = {"bits": 8}
    plan.write_text(json.dumps(d))
    code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", plan, "-o", tmp_path / "o")
    assert code == 2 and "encoder.layer.9.output.dense, which the model does not have" in err
    del d["layers"]["encoder.layer.9.output.dense"]
    d["layers"]["encoder.layer.0.output.dense"]["bits"] = 3
    plan.write_text(json.dumps(d))
    code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", plan, "-o", tmp_path / "o")
    assert code == 2 and "layer encoder.layer.0.output.dense: bits 3 is not one of 4, 8, 16" in err
    d["layers"]["encoder.layer.0.output.dense"] = {"bits": 4, "group_size": 32}
    plan.write_text(json.dumps(d))
    code, _, err = run(capsys, "apply", tiny_bert_dir, "--plan", plan, "-o", tmp_path / "o")
    assert code == 2 and "group_size 32 does not divide in_features 80" in err
    assert not (tmp_path / "o").exists()


def test_empty_calibration_text(tiny_bert_dir, tmp_path, capsys):
    plan = tmp_path / "p.json"
    run(capsys, "plan", tiny_bert_dir, "--bits", "8", "-o", plan)
    run(capsys, "apply", tiny_bert_dir, "--plan", plan, "-o", tmp_path / "c")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    code, _, err = run(capsys, "eval", tmp_path / "c", "--data", empty)
    assert code == 2 and "holds no text" in err


def test_help_for_each_command(capsys):
    for cmd in ("plan", "apply", "eval", "inspect"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: compress" in capsys.readouterr().out


def test_export_command(tiny_bert_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    plan = tmp_path / "p.json"
    run(capsys, "plan", tiny_bert_dir, "--bits", "4", "--group-size", "32", "-o", plan)
    run(capsys, "apply", tiny_bert_dir, "--plan", plan, "-o", tmp_path / "c")
    code, out, _ = run(capsys, "export", tmp_path / "c", "-o", tmp_path / "m.onnx", "--json", tmp_path / "r.json")
    assert code == 0 and "MatMulNBits (bits=4)" in out and (tmp_path / "m.onnx").exists()
    assert json.loads((tmp_path / "r.json").read_text())["validated"] is True
    code, _, err = run(capsys, "export", tmp_path / "c", "-o", tmp_path / "m.onnx")
    assert code == 2 and "exists" in err


@pytest.mark.parametrize("flag, value, key, bad", [("--fp-target", "0.5", "fp_target", "-1"),
                                                   ("--token-damp", "0.5", "token_damp", "-2")])
def test_plan_records_a_gptq_option_and_a_bad_one_writes_nothing(tiny_llama_dir, tmp_path, flag, value, key, bad):
    out = tmp_path / "p.json"
    rc = main(["plan", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--quantizer", "gptq",
               flag, value, "--target", "any", "-o", str(out)])
    assert rc in (0, None) and json.loads(out.read_text())["quantizer"][key] == float(value)
    rc = main(["plan", str(tiny_llama_dir), "--bits", "4", "--quantizer", "gptq", flag, bad,
               "--target", "any", "-o", str(tmp_path / "bad.json")])
    assert rc == 2 and not (tmp_path / "bad.json").exists()
