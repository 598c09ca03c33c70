"""In-place key/value cache for ONNX decoding: com.microsoft GroupQueryAttention over one buffer.

The default causal-LM export with ``past_key_values`` returns past + new as a fresh tensor per layer
every step (a Concat that copies the whole cache: 10 % of an opset-23 decode step of a 206 M Llama,
bench/gguf_bench.py). With ``export_onnx(..., inplace_cache=True)`` each layer's opset-23 attention
block (RotaryEmbedding on q and k, the two cache Concats, Attention and the transposes around them)
is replaced by one GroupQueryAttention node that applies RoPE itself and writes the new keys and
values into the past buffer in place when the caller binds the same buffer as past input and
present output (onnxruntime IOBinding). Where q, k and v are three MatMulNBits of one input with equal
attributes, they become one (their tensors concatenated along N: the same products, column by
column) feeding GroupQueryAttention's packed-QKV form: fewer int4 calls per token (on the 206 M Llama
about 9 % of a step). The signature then is

    input_ids              int64 (B, T)
    seqlens_k              int32 (B,)      tokens in the cache after this step, minus one
    total_sequence_length  int32 ()        tokens in the cache after this step (max over the batch)
    past_key_values.{i}.key / .value  float (B, H_kv, M, D_h), M the buffer length (<= max_length)
    -> logits (B, T, V), present.{i}.key / .value: the same buffers (M unchanged)

Rows are unpadded (every row of a batch holds the same number of tokens; the bench and
``InplaceDecoder`` decode one sequence). The graph's attention_mask input is gone: GroupQueryAttention
is causal over the first seqlens_k + 1 positions. RoPE tables (cos, sin of shape (max_length,
D_h / 2)) come from the model's own rotary embedding, so scaled RoPE variants are what torch computes.
``InplaceDecoder`` is the decode loop a user runs on such a file (what the bench times).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CompressError

MAX_LENGTH_CAP = 4096  # default RoPE table length when the config allows more (2 x 4096 x D_h/2 floats)
METADATA_KEY = "compress.inplace_cache.max_length"


def rotary_tables(model, max_length: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (max_length, D_h / 2) in ``dtype``, from the model's rotary embedding (a
    Hugging Face Llama-style ``model.model.rotary_emb``: cos / sin of shape (1, L, D_h) whose two
    halves repeat, with any scaling it applies)."""
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rot is None:
        raise CompressError(f"inplace cache: {type(model).__name__} has no model.rotary_emb to take RoPE tables from")
    pos = torch.arange(max_length).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    half = cos.shape[-1] // 2
    if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
        raise CompressError("inplace cache: the model's RoPE tables are not two repeated halves (rotate-half RoPE)")
    to = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
    return cos[0, :, :half].float().numpy().astype(to), sin[0, :, :half].float().numpy().astype(to)


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def rewrite(model, cos: np.ndarray, sin: np.ndarray) -> int:
    """Rewrite an opset-23 causal-LM graph with past_key_values (onnx ModelProto, in place) to the
    module docstring's signature; returns the number of attention blocks replaced. CompressError
    naming the node when a block is not the expected pattern (e.g. a float16 graph, where torch.onnx
    spells RoPE out, or key/value heads repeated before Attention)."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def up(name: str, op: str, at):
        node = producer.get(name)
        if node is None or node.op_type != op:
            raise CompressError(f"inplace cache: {at.name} ({at.op_type}) input {name} comes from "
                                f"{node.op_type if node else 'a graph input'}, expected {op}")
        return node

    def cache_concat(name: str, at):
        """The Concat(past, new) under Attention's key / value input, through repeat_kv's
        Unsqueeze -> Expand -> Reshape when key/value heads are fewer than query heads."""
        node = producer.get(name)
        if node is not None and node.op_type == "Reshape":
            expand = up(node.input[0], "Expand", node)
            return up(up(expand.input[0], "Unsqueeze", expand).input[0], "Concat", expand)
        return up(name, "Concat", at)

    def projection(name: str, at) -> str:
        """The (B, T, H·D) projection output under Reshape -> Transpose (-> RotaryEmbedding)."""
        t = up(name, "Transpose", at)
        return up(t.input[0], "Reshape", t).input[0]

    replaced, drop, before = {}, set(), {}
    for n in g.node:
        if n.op_type != "Attention":
            continue
        q_rope = up(n.input[0], "RotaryEmbedding", n)
        cat_k, cat_v = cache_concat(n.input[1], n), cache_concat(n.input[2], n)
        k_rope = up(cat_k.input[1], "RotaryEmbedding", cat_k)
        after = consumers.get(n.output[0], [])
        if any(n.output[1:]) or len(after) != 1 or after[0].op_type != "Transpose":
            raise CompressError(f"inplace cache: {n.name}'s output is not only transposed back")
        reshape = consumers.get(after[0].output[0], [])
        if len(reshape) != 1 or reshape[0].op_type != "Reshape":
            raise CompressError(f"inplace cache: {after[0].name} is not followed by one Reshape")
        if _attr(n, "is_causal", 0) or _attr(n, "softcap", 0.0) or len(n.input) < 4:
            raise CompressError(f"inplace cache: {n.name} has attributes GroupQueryAttention does not take")
        heads, kv_heads = _attr(q_rope, "num_heads"), _attr(k_rope, "num_heads")
        if not heads or not kv_heads or _attr(q_rope, "interleaved", 0) != _attr(k_rope, "interleaved", 0):
            raise CompressError(f"inplace cache: {q_rope.name} / {k_rope.name} lack num_heads or disagree")
        past = {i.name for i in g.input}
        if cat_k.input[0] not in past or cat_v.input[0] not in past:
            raise CompressError(f"inplace cache: {cat_k.name} / {cat_v.name} do not extend a past_key_values input")
        inputs = [projection(q_rope.input[0], q_rope), projection(k_rope.input[0], k_rope),
                  projection(cat_v.input[1], cat_v), cat_k.input[0], cat_v.input[0],
                  "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1,
                 "rotary_interleaved": _attr(q_rope, "interleaved", 0)}
        if _attr(n, "scale") is not None:
            attrs["scale"] = _attr(n, "scale")
        packed = _pack_projections(g, producer, inputs[:3], f"{n.name}_qkv")
        if packed is not None:  # one int4 product for q, k and v (GroupQueryAttention's packed form)
            before.setdefault(id(n), []).append(packed)
            inputs[:3] = [packed.output[0], "", ""]
        replaced[id(n)] = helper.make_node("GroupQueryAttention", inputs,
                                           [reshape[0].output[0], cat_k.output[0], cat_v.output[0]],
                                           name=f"{n.name}_gqa", domain="com.microsoft", **attrs)
        drop |= {id(cat_k), id(cat_v), id(after[0]), id(reshape[0])}
    if not replaced:
        raise CompressError("inplace cache: the graph has no opset-23 Attention node (export at opset 23)")
    nodes = [m for n in g.node if id(n) not in drop for m in (*before.get(id(n), ()), replaced.get(id(n), n))]
    needed = {o.name for o in g.output}
    kept = []
    for n in reversed(nodes):  # drop what fed only the replaced blocks (masks, positions, RoPE caches)
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(kept))
    inputs = [i for i in g.input if i.name in needed]
    del g.input[:]
    g.input.extend(inputs[:1])
    g.input.extend([helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                    helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])])
    g.input.extend(inputs[1:])
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits + [numpy_helper.from_array(cos, "cos_cache"), numpy_helper.from_array(sin, "sin_cache")])
    del g.value_info[:]  # shapes of removed values; onnxruntime infers the rest
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, str(cos.shape[0])
    return len(replaced)


def _pack_projections(g, producer: dict, names: list[str], name: str):
    """One MatMulNBits computing the q, k, v projections ``names`` side by side (their B, scales and
    zero points concatenated along N: each output column is the same product as before), or None
    where they are not three MatMulNBits of one input with equal attributes and no bias / g_idx."""
    from onnx import helper, numpy_helper

    nodes = [producer.get(x) for x in names]
    if any(m is None or m.op_type != "MatMulNBits" or m.domain != "com.microsoft" for m in nodes):
        return None
    keys = ("K", "bits", "block_size", "accuracy_level")
    if len({m.input[0] for m in nodes}) != 1 or len({tuple(_attr(m, k) for k in keys) for m in nodes}) != 1:
        return None
    arity = {len([i for i in m.input if i]) for m in nodes}
    if arity not in ({3}, {4}) or any(len(m.input) > 4 for m in nodes):
        return None
    inits = {i.name: i for i in g.initializer}
    if any(i not in inits for m in nodes for i in m.input[1:] if i):
        return None
    parts = []
    for slot in range(1, arity.pop()):
        arrays = [numpy_helper.to_array(inits[m.input[slot]]) for m in nodes]
        parts.append(numpy_helper.from_array(np.concatenate(arrays, axis=0), f"{name}.{slot}"))
    g.initializer.extend(parts)
    attrs = {k: _attr(nodes[0], k) for k in keys if _attr(nodes[0], k) is not None}
    attrs["N"] = sum(_attr(m, "N") for m in nodes)
    return helper.make_node("MatMulNBits", [nodes[0].input[0], *(p.name for p in parts)], [f"{name}_out"],
                            name=name, domain="com.microsoft", **attrs)


def rewrite_file(path: Path, cos: np.ndarray, sin: np.ndarray) -> int:
    """``rewrite`` on a written .onnx file (and its external data, kept external under its name)."""
    import onnx

    path = Path(path)
    data = [f for f in path.parent.iterdir() if f != path]  # the staging directory holds this export only
    model = onnx.load(str(path))
    count = rewrite(model, cos, sin)
    for f in data:
        f.unlink()
    if data:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data[0].name)
    else:
        onnx.save(model, str(path))
    return count


def reference_runs(wrapper, config, batch: int = 2, prompt: int = 7, steps: int = 2,
                   seed: int = 0) -> list[tuple[tuple, tuple[torch.Tensor]]]:
    """Validation for an in-place graph: a (batch, prompt) unpadded prompt then ``steps`` single-token
    steps through the PyTorch model's own cache; ((input_ids int64 (B, T), attention_mask (B, P + T)),
    (logits (B, T, V),)) per call, as ``validate.compare`` takes them."""
    from .validate import empty_past

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=gen)
    mask = torch.ones_like(ids)
    runs, past = [], empty_past(config, batch, 0, torch.float32)
    with torch.no_grad():
        for _ in range(steps + 1):
            out = wrapper(ids, mask, past)
            runs.append(((ids, mask), (out[0],)))
            past = list(out[1:])
            ids = torch.randint(0, config.vocab_size, (batch, 1), generator=gen)
            mask = torch.cat((mask, torch.ones_like(ids)), dim=1)
    return runs


def run_references(session, runs) -> list[list[np.ndarray]]:
    """onnxruntime's logits for ``reference_runs`` through an InplaceDecoder whose buffers hold
    exactly the run's tokens (the last step fills them)."""
    (ids, _), _ = runs[0]
    total = runs[-1][0][1].shape[1]
    dec = InplaceDecoder(session, batch=ids.shape[0], max_length=total)
    return [[dec.step(args[0].numpy()).copy()] for args, _ in runs]


class InplaceDecoder:
    """The decode loop for a graph exported with ``inplace_cache=True`` (module docstring): one
    (B, H_kv, max_length, D_h) buffer per key and value, bound through onnxruntime IOBinding as both
    the past input and the present output, so no step copies the cache; a (B, 1, V) logits buffer
    bound once for single-token steps.

        dec = InplaceDecoder(session)          # an onnxruntime.InferenceSession on the file
        logits = dec.step(prompt_ids)          # int64 (B, T) -> (B, T, V)
        logits = dec.step(next_ids)            # int64 (B, 1) -> (B, 1, V), valid until the next step
    """

    def __init__(self, session, batch: int = 1, max_length: int | None = None) -> None:
        import onnxruntime as ort

        self.sess, self.batch = session, batch
        limit = int(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, 0))
        if not limit:
            raise CompressError("InplaceDecoder: the graph was not exported with inplace_cache=True")
        self.max_length = limit if max_length is None else max_length
        if not 0 < self.max_length <= limit:
            raise CompressError(f"InplaceDecoder: max_length must be 1..{limit} (the file's RoPE table), got {max_length}")
        past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
        self.dtype = np.float16 if "float16" in past[0].type else np.float32
        heads, size = past[0].shape[1], past[0].shape[3]
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, heads, self.max_length, size), self.dtype))
                        for _ in past]
        self.logits_name = session.get_outputs()[0].name
        vocab = session.get_outputs()[0].shape[2]
        self.last = np.zeros((batch, 1, vocab), self.dtype)
        self._last_value = ort.OrtValue.ortvalue_from_numpy(self.last)  # shares self.last's memory
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_output(self.logits_name, self._last_value)  # first: get_outputs()[0]
        for p, buf in zip(past, self.buffers):
            self.binding.bind_ortvalue_input(p.name, buf)
            self.binding.bind_ortvalue_output(p.name.replace("past_key_values", "present"), buf)
        self.length = 0
        self._seqlens = np.zeros((batch,), np.int32)
        self._total = np.zeros((), np.int32)

    def reset(self) -> None:
        """Forget the sequence (the buffers' old contents are masked by seqlens_k, not cleared)."""
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Run int64 ids (B, T) after the cached tokens; returns logits (B, T, V) in the graph's dtype
        (for T = 1 the bound buffer itself, overwritten by the next step)."""
        t = ids.shape[1]
        if ids.shape[0] != self.batch or self.length + t > self.max_length:
            raise CompressError(f"InplaceDecoder: {ids.shape[0]} rows of {t} tokens after {self.length} do not "
                                f"fit batch {self.batch} x max_length {self.max_length}")
        self.length += t
        self._seqlens.fill(self.length - 1)
        self._total.fill(self.length)
        b = self.binding
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("seqlens_k", self._seqlens)
        b.bind_cpu_input("total_sequence_length", self._total)
        if t == 1:
            b.bind_ortvalue_output(self.logits_name, self._last_value)
        else:
            b.bind_output(self.logits_name, "cpu")
        self.sess.run_with_iobinding(b)
        return self.last if t == 1 else b.get_outputs()[0].numpy()
