"""The ONNX exporter's default opset has one owner (compress.export.onnx_export.default_opset): 23
(fused attention / RoPE / RMSNorm, the faster decode graph) with onnxruntime >= 1.23, else 21; 21
for the Gemma family; an explicit opset always wins, and the report says which it was and why."""
import sys

import pytest

from compress.export import onnx_export as ox

ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install '.[onnx]'")


@pytest.mark.parametrize("version,want", [("1.32.0", 23), ("1.23.0", 23), ("1.24.0.dev20250101", 23),
                                          ("1.22.1", 21), ("1.20.0", 21), ("1.9.0", 21)])
def test_default_follows_the_installed_onnxruntime(monkeypatch, version, want):
    monkeypatch.setattr(ort, "__version__", version)
    opset, why = ox.default_opset("llama")
    assert opset == want and f"onnxruntime {version} installed" in why
    for kind in ("bert", "gpt2", None):  # encoders and causal LMs alike
        assert ox.default_opset(kind)[0] == want


def test_gemma_and_no_onnxruntime_take_21(monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.32.0")
    for model_type in ox.GEMMA_MODEL_TYPES:
        opset, why = ox.default_opset(model_type)
        assert opset == 21 and model_type in why
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert ox.default_opset("llama") == (21, "default: onnxruntime not installed")


def test_the_report_names_the_choice():
    common = dict(path="m.onnx", external_data=None, kind="causal-lm", past_key_values=False, accuracy_level=4,
                  layers={}, reblocked=[], onnx_bytes=1, compressed_bytes=1, fp32_bytes=4, export_seconds=0.0,
                  validated=False)
    rows = dict(ox.ExportReport(opset=23, opset_source="default: onnxruntime 1.32.0 installed", **common).rows())
    assert rows["opset"] == "23 (default: onnxruntime 1.32.0 installed)"
    assert dict(ox.ExportReport(opset=21, **common).rows())["opset"] == 21  # given: the number alone


def test_an_explicit_opset_is_checked_before_loading(tmp_path):
    from compress.errors import CompressError

    with pytest.raises(CompressError, match="opset must be between 18 and 23, got 24"):
        ox.export_onnx(tmp_path / "missing", tmp_path / "m.onnx", opset=24)
