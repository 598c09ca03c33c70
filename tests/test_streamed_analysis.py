"""Streamed (low-memory) sensitivity analysis: the same scores and plans as in memory, one block of
weights resident at a time, block states spilled to disk, and the bad inputs of issue 18."""
import errno
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import compress
from compress.analyze import REGISTRY, analyze
from compress.analyze import store as store_module
from compress.analyze.store import OffloadWarning, StateStore
from compress.analyze.streamed import BlockLoader, load_streamed
from compress.cli import main
from compress.data import default_corpus, load_texts
from compress.errors import CompressError, DiskFullError
from compress.models import load_model

FAST = dict(samples=4, seq_len=24, batch_size=2, progress=False)
VOCAB = 256


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _word_tokenizer():
    """A word-level tokenizer over the default corpus's VOCAB - 2 commonest words (+ unk, eos)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for t in default_corpus() for w in t.lower().split())
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, (w, _) in enumerate(counts.most_common(VOCAB - 2))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _save(model, path: Path) -> Path:
    model.eval().save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Small-vocabulary causal LMs (tied Llama, untied Llama, GPT-2 with Conv1D), 3 blocks each."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("streamed")
    out = {}
    for name, tied in (("llama", True), ("llama-untied", False)):
        torch.manual_seed(1)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=tied)
        out[name] = _save(LlamaForCausalLM(cfg), root / name)
    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=128)
    out["gpt2"] = _save(GPT2LMHeadModel(cfg), root / "gpt2")
    return out


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def texts():
    return default_corpus()[:60]


def _both(path, method, data, **kw):
    """(in-memory Sensitivity, streamed Sensitivity) of one method."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cmpq: few samples for its widths
        a = analyze(load_model(path), method, data, **{**FAST, **kw})
        b = analyze(load_streamed(path), method, data, **{**FAST, **kw})
    return a, b


def _assert_same(a, b, rel=1e-6):
    assert a.units == b.units and a.params == b.params
    assert a.scores == pytest.approx(b.scores, rel=rel, abs=1e-12)
    if a.damage is None:
        assert b.damage is None
    else:
        for unit in a.damage:
            assert a.damage[unit] == pytest.approx(b.damage[unit], rel=rel, abs=1e-12), unit
    assert b.provenance["low_memory"] is True and "low_memory" not in a.provenance
    ra, rb = a.provenance["reference_metric"], b.provenance["reference_metric"]
    assert (ra is None and rb is None) or ra == pytest.approx(rb, rel=1e-9)


# ---- the same scores as in memory ------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["block", "module"])
@pytest.mark.parametrize("method", sorted(REGISTRY))
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_streamed_equals_in_memory_causal(tiny, windows, which, method, granularity):
    a, b = _both(tiny[which], method, windows, granularity=granularity, causal_metric="nll")
    _assert_same(a, b)


@pytest.mark.parametrize("method", ["oracle", "fisher", "cmpq"])
def test_layers_with_their_own_masks(tmp_path, windows, method):
    """Gemma 2 alternates sliding-window and global layers: each block gets its own mask (recorded
    per block by the stand-ins)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(3)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=6,
                       max_position_embeddings=64)
    path = _save(Gemma2ForCausalLM(cfg), tmp_path / "gemma2")
    a, b = _both(path, method, windows, granularity="module", causal_metric="nll")
    _assert_same(a, b)


@pytest.mark.parametrize("method", ["oracle", "taylor", "fisher", "tdmpq"])
def test_streamed_equals_in_memory_kl(tiny, windows, method):
    """The kl metric (references kept in the store; the second-order taylor form per sample)."""
    a, b = _both(tiny["llama"], method, windows, granularity="module", causal_metric="kl")
    _assert_same(a, b)


@pytest.mark.parametrize("granularity", ["block", "module"])
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_streamed_equals_in_memory_encoder(tiny_bert_dir, texts, method, granularity):
    a, b = _both(tiny_bert_dir, method, texts, granularity=granularity)
    _assert_same(a, b)


@pytest.mark.parametrize("method", ["oracle", "pmpq", "taylor", "fisher", "cmpq"])
def test_units_outside_the_blocks(tiny, windows, method):
    """An output head as a unit (only the tail re-runs), and an embedding table tied to its head
    (runs before the first block: trials walk every block, gradients reach it last)."""
    metric = {"taylor": "kl"}.get(method, "nll")
    a, b = _both(tiny["llama-untied"], method, windows, granularity="module", include_heads=True,
                 causal_metric=metric)
    assert "lm_head" in b.units
    _assert_same(a, b)
    if method in ("oracle", "pmpq", "taylor", "fisher"):
        a, b = _both(tiny["llama"], method, windows, granularity="block", include_embeddings=True,
                     causal_metric=metric)
        assert b.units["model.embed_tokens"] == ["model.embed_tokens", "lm_head"]
        _assert_same(a, b)


def test_one_block_resident_at_a_time(tiny, windows, monkeypatch):
    """Whenever a block runs, every other block's weights are on the meta device."""
    lm = load_streamed(tiny["llama"])
    blocks = BlockLoader(lm).blocks
    seen = []

    def check(module, args, kwargs):
        real = [i for i, blk in enumerate(blocks) if any(p.device.type != "meta" for p in blk.parameters())]
        seen.append(real)

    hooks = [blk.register_forward_pre_hook(check, with_kwargs=True) for blk in blocks]
    try:
        for method in ("oracle", "fisher", "cmpq"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                analyze(lm, method, windows, granularity="module", causal_metric="nll", **FAST)
    finally:
        for h in hooks:
            h.remove()
    assert seen and all(len(real) == 1 for real in seen), seen[:5]
    assert all(p.device.type == "meta" for blk in blocks for p in blk.parameters())


def test_same_plan(tiny):
    """compress.plan --low-memory gives the in-memory plan: a damage method, and a rank-only one
    whose per-width noise comes from the streamed weights."""
    for method in ("fisher", "pmpq"):
        kw = dict(method=method, granularity="module", budget=7.0, samples=4, progress=False, target="any",
                  metric="nll")
        a = compress.plan(tiny["llama"], **kw)
        b = compress.plan(tiny["llama"], low_memory=True, **kw)
        assert {n: lp.bits for n, lp in a.layers.items()} == {n: lp.bits for n, lp in b.layers.items()}
        assert len({lp.bits for lp in a.layers.values()}) > 1, "a uniform plan proves little"
        assert a.fingerprint == b.fingerprint
        assert b.sensitivity["provenance"]["low_memory"] is True


# ---- block states on disk ----------------------------------------------------------------------------

def test_states_spill_to_disk_and_are_removed(tiny, windows, tmp_path):
    offload = tmp_path / "offload"
    a = analyze(load_model(tiny["llama"]), "fisher", windows, granularity="module", causal_metric="kl", **FAST)
    lm = load_streamed(tiny["llama"], state_budget=0, offload_dir=offload)
    with pytest.warns(OffloadWarning, match=r"exceed the 0.00 GiB kept in memory: the rest go to .*offload"):
        b = analyze(lm, "fisher", windows, granularity="module", causal_metric="kl", **FAST)
    _assert_same(a, b)
    assert b.provenance["offloaded_bytes"] > 0
    assert list(offload.iterdir()) == [], "spilled states left behind"
    lm.state_budget = 10 << 20
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffloadWarning)  # fits: nothing goes to disk
        c = analyze(lm, "oracle", windows, granularity="block", causal_metric="nll", **FAST)
    assert c.provenance["offloaded_bytes"] == 0


def test_store_roundtrip(tmp_path):
    with StateStore(budget=100, directory=tmp_path) as s:
        small, big = torch.arange(5, dtype=torch.int64), torch.randn(3, 7).to(torch.bfloat16)
        with pytest.warns(OffloadWarning):
            s.put("a", small)  # 40 bytes: in memory
            s.put("b", big)    # 42 bytes: fits too
            s.put("c", torch.randn(40))  # 160 bytes: to disk
        assert torch.equal(s.get("a"), small) and torch.equal(s.get("b"), big)
        assert s.on_disk == 160 and s.used == 82
        c = s.get("c")
        s.put("c", c * 2)
        assert torch.equal(s.get("c"), c * 2)
        s.pop("c")
        assert "c" not in s and s.on_disk == 0
    assert list(tmp_path.iterdir()) == []


def _full_disk(monkeypatch):
    """Every file the store writes fails as on a full disk."""
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_module, "open", fake_open, raising=False)


def test_no_disk_space_for_block_states(tiny, windows, tmp_path, monkeypatch):
    offload = tmp_path / "offload"
    _full_disk(monkeypatch)
    lm = load_streamed(tiny["llama"], state_budget=0, offload_dir=offload)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadWarning)
        with pytest.raises(DiskFullError, match=r"no space left on device for analysis block states in .*offload.*"
                                                r"bytes needed so far, [0-9,]+ free; the states were removed"):
            analyze(lm, "fisher", windows, **FAST)
    assert list(offload.iterdir()) == []


def test_cli_full_disk_one_line(tiny, tmp_path, monkeypatch, capsys):
    """`compress plan --low-memory` on a full disk: exit 2, one line, no plan, no states left."""
    _full_disk(monkeypatch)
    monkeypatch.setattr(store_module, "default_budget", lambda: 0)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "plan.json"
    code = main(["plan", str(tiny["llama"]), "--method", "fisher", "--budget", "5", "--samples", "2",
                 "--low-memory", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no space left on device for analysis block states" in err[0], err
    assert not out.exists() and list((tmp_path / "tmp").iterdir()) == []


def _mount_tmpfs(where: Path, size: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


def test_real_full_tmpfs(tiny, windows, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 64 * 1024):
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs)")
    try:
        lm = load_streamed(tiny["llama"], state_budget=0, offload_dir=disk)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OffloadWarning)
            with pytest.raises(DiskFullError, match="no space left on device for analysis block states"):
                analyze(lm, "oracle", windows, **{**FAST, "samples": 4, "seq_len": 64})
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---- bad input ------------------------------------------------------------------------------------

def _copy_model(src: Path, dst: Path, rename=None, reshape=None) -> Path:
    """A copy of a model directory whose checkpoint has keys renamed / a tensor reshaped."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for old, new in (rename or {}).items():
        tensors[new] = tensors.pop(old)
    for name, shape in (reshape or {}).items():
        tensors[name] = torch.zeros(shape)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_checkpoint_names_that_do_not_match(tiny, tmp_path):
    bad = _copy_model(tiny["llama"], tmp_path / "renamed", rename={"model.norm.weight": "model.final_norm.weight"})
    with pytest.raises(CompressError, match=r"tensor names do not match LlamaForCausalLM: 1 of its \d+ parameters "
                                            r"are missing, e.g. \['model.norm.weight'\]; it holds 1 tensors the "
                                            r"model lacks, e.g. \['model.final_norm.weight'\]"):
        load_streamed(bad)
    bad = _copy_model(tiny["llama"], tmp_path / "reshaped", reshape={"model.layers.1.mlp.up_proj.weight": (64, 40)})
    with pytest.raises(CompressError, match=r"model.layers.1.mlp.up_proj.weight has shape \(64, 40\), "
                                            r"LlamaForCausalLM expects \(64, 48\)"):
        load_streamed(bad)


def test_base_model_checkpoint_names(tiny, windows, tmp_path):
    """A checkpoint saved from the base model ("h.0..." for GPT2LMHeadModel's "transformer.h.0...")."""
    from safetensors.torch import load_file

    keys = load_file(tiny["gpt2"] / "model.safetensors")
    base = _copy_model(tiny["gpt2"], tmp_path / "base",
                       rename={k: k[len("transformer."):] for k in keys if k.startswith("transformer.")})
    a = analyze(load_model(tiny["gpt2"]), "fisher", windows, causal_metric="nll", **FAST)
    b = analyze(load_streamed(base), "fisher", windows, causal_metric="nll", **FAST)
    _assert_same(a, b)


def test_calibration_too_small(tiny_llama_dir, tiny_bert_dir, texts):
    with pytest.raises(CompressError, match=r"calibration data too small: 32 samples asked, the texts give 5 "
                                            r"windows of 24 tokens; give more text or fewer samples"):
        analyze(load_streamed(tiny_llama_dir), "fisher", texts[:1], **{**FAST, "samples": 32})
    with pytest.raises(CompressError, match=r"32 samples asked, the texts give 3 texts"):
        analyze(load_streamed(tiny_bert_dir), "oracle", texts[:3], **{**FAST, "samples": 32})


def test_missing_checkpoint(tmp_path, tiny):
    d = tmp_path / "nockpt"
    shutil.copytree(tiny["llama"], d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CompressError, match="block-by-block loading needs safetensors weights"):
        load_streamed(d)


# ---- the CLI ----------------------------------------------------------------------------------------

def test_cli_analyze_low_memory_metric_eval_data(tiny, tmp_path, capsys):
    eval_file = tmp_path / "held_out.txt"
    eval_file.write_text("\n".join(default_corpus()[200:260]) + "\n")
    out = tmp_path / "rows.json"
    code = main(["analyze", str(tiny["llama"]), "--methods", "fisher", "--samples", "4", "--low-memory",
                 "--metric", "kl", "--eval-data", str(eval_file), "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["oracle", "fisher"]
    oracle = rows[0]["sensitivity"]
    assert oracle["provenance"]["low_memory"] is True and oracle["provenance"]["metric"] == "mean_kl"
    held_out = analyze(load_model(tiny["llama"]), "oracle", load_texts(eval_file), samples=4,
                       causal_metric="kl", progress=False)
    assert oracle["scores"] == pytest.approx(held_out.scores, rel=1e-6)
    calib = analyze(load_model(tiny["llama"]), "oracle", load_texts(None), samples=4,
                    causal_metric="kl", progress=False)
    assert oracle["scores"] != pytest.approx(calib.scores, rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_on_cuda_matches_cpu(tiny, windows):
    for method in ("oracle", "fisher", "cmpq"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = analyze(load_model(tiny["llama"]), method, windows, granularity="module", causal_metric="nll", **FAST)
            b = analyze(load_streamed(tiny["llama"], "cuda"), method, windows, granularity="module",
                        causal_metric="nll", **FAST)
        assert b.provenance["device"].startswith("cuda")
        ranked = sorted(a.scores, key=a.scores.get)
        assert sorted(b.scores, key=b.scores.get) == ranked or method == "tdmpq"
        assert a.scores == pytest.approx(b.scores, rel=2e-2, abs=1e-6)
