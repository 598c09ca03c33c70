"""Walking a model one transformer block at a time, with weights streamed from disk.

GPTQ needs each linear layer's calibration inputs *as the quantized model so far produces them*,
and a model larger than memory cannot be loaded whole. Both are solved by the same walk:

1. Build the model with its parameters on the meta device (accelerate's ``init_empty_weights``);
   load from the checkpoint only the tensors outside the blocks (embeddings, final norm, head).
2. Run the calibration batches up to the first block and keep its inputs (positional and keyword:
   attention masks, rotary tables), stopping the forward pass there.
3. For each block: load its weights from the checkpoint (safetensors, lazily, onto ``device``),
   collect every linear layer's Hessian from the kept inputs, quantize the block's layers (GPTQ or
   round to nearest), run the *quantized* block to get the next block's inputs, then move the
   packed block to the CPU. Only one block of full-precision weights is ever resident.

The result is the compressed model in memory (packed weights are 4-8x smaller than fp32) ready for
``apply.save_compressed``.
"""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import CompressError
from .plan import LayerPlan

# A pre-hook raises this to stop the forward pass once the first block's inputs are captured.
class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks (the analyzers' rule: the nn.ModuleList of
    same-class children that covers the most linear weights). Returns its qualified name
    (``model.layers``, ``encoder.layer``) and the list itself.
    """
    from .analyze.base import find_blocks as find_block_list

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    blocks = find_block_list(model, linears)
    if blocks is None:
        raise CompressError(f"{type(model).__name__} has no stack of blocks (an nn.ModuleList of layers) to walk")
    return blocks.name, blocks.modules


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class CheckpointReader:
    """Reads single tensors of a local HF checkpoint (model.safetensors or a sharded index).

    Each tensor is read with seek + readinto straight from its byte range in the file, never by
    mapping the file: a memory map keeps every page it has touched resident (and counts against a
    data-segment limit), which would bring the whole checkpoint back into memory block by block.
    """

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CompressError(f"{path}: block-by-block loading needs safetensors weights "
                                "(model.safetensors or model.safetensors.index.json)")
        self.path = path
        self.entries: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data start, header entry)
        for name in files:
            file = path / name
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(size))
                except json.JSONDecodeError as exc:
                    raise CompressError(f"{file}: corrupted safetensors header ({exc.msg})") from None
            for key, entry in header.items():
                if key != "__metadata__":
                    self.entries[key] = (file, 8 + size, entry)
        self.weight_map = {k: v[0].name for k, v in self.entries.items()}

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor ``name``, read into fresh CPU memory, then moved to ``device``."""
        if name not in self.entries:
            raise CompressError(f"{self.path}: checkpoint has no tensor {name}")
        file, base, entry = self.entries[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise CompressError(f"{file}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
        if (raw.nbytes if raw is not None else 0) != end - start:
            raise CompressError(f"{file}: tensor {name} spans {end - start} bytes, its shape needs "
                                f"{0 if raw is None else raw.nbytes}")
        if raw is not None:
            with open(file, "rb") as f:
                f.seek(base + start)
                if f.readinto(memoryview(raw)) != raw.nbytes:
                    raise CompressError(f"{file} is truncated: tensor {name} is incomplete")
        return t.to(device)


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, device, dtype: torch.dtype) -> None:
    """Replace ``module``'s meta parameters by the checkpoint's tensors (floating ones cast to dtype)."""
    for name, p in list(module.named_parameters(recurse=True)):
        if p.device.type != "meta":
            continue
        t = reader.get(f"{prefix}{name}", device)
        if t.shape != p.shape:
            raise CompressError(f"checkpoint tensor {prefix}{name} has shape {tuple(t.shape)}, "
                                f"the model expects {tuple(p.shape)}")
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, attr, nn.Parameter(t.to(dtype) if t.is_floating_point() else t, requires_grad=False))


def empty_model(path: Path, kind: str) -> nn.Module:
    """The model of a local directory built with parameters on the meta device (buffers real)."""
    from .models import build_empty, load_config

    return build_empty(kind, load_config(path))


def fix_malloc_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve allocations over ``nbytes`` from fresh memory maps that are returned on free (glibc).

    glibc raises its mmap threshold after the first large free (up to 32 MB), after which freed
    weight tensors of a processed block stay in the heap: measured here, resident memory then grew
    by a whole fp32 block per block walked. A fixed threshold keeps the walk's memory flat. Returns
    False where there is no glibc (the walk still works, with a higher peak).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(-3, nbytes))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM; ru_maxrss where /proc is absent).

    VmHWM first because Linux carries ru_maxrss across exec: a process started by a large parent
    would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def walk_blocks(model: nn.Module, batches: list[dict], quantize_block, device: str | torch.device = "cpu",
                reader: CheckpointReader | None = None, dtype: torch.dtype = torch.float32,
                progress: bool = True) -> dict:
    """Run ``quantize_block(index, prefix, block, inputs)`` on every block in order.

    batches: model inputs (dicts of tensors, e.g. input_ids / attention_mask), one per calibration
    batch. quantize_block gets the block (weights on ``device``) and its inputs as a list of
    (args, kwargs) per batch; it quantizes the block in place and returns nothing. The walker then
    runs the quantized block to produce the next block's inputs. With ``reader``, meta parameters
    are loaded from the checkpoint just in time. Returns {"peak_rss_bytes", "peak_cuda_bytes"}.
    """
    blocks_name, blocks = find_blocks(model)
    if reader is not None:
        fix_malloc_mmap_threshold()
        load_outside_blocks(model, blocks, reader, dtype)
    _move_outside(model, blocks, device)

    captured: list[tuple[tuple, dict]] = []

    def capture(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not captured:
        raise CompressError("no calibration batch reached the first block")

    for i, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress, leave=False)):
        prefix = f"{blocks_name}.{i}."
        if reader is not None:
            materialize(block, prefix, reader, device, dtype)
        block.to(device)
        quantize_block(i, prefix, block, captured)
        outputs = []
        for args, kwargs in captured:
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            if args:
                outputs.append(((hidden,) + tuple(args[1:]), kwargs))
            else:  # the model passes hidden states by keyword
                outputs.append((args, {**kwargs, "hidden_states": hidden}))
        captured = outputs
        block.to("cpu")
    _move_outside(model, blocks, "cpu")
    stats = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        stats["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return stats


def load_outside_blocks(model: nn.Module, blocks: nn.ModuleList, reader: CheckpointReader,
                        dtype: torch.dtype) -> None:
    """Load every parameter outside the blocks from the checkpoint; tied heads are re-tied."""
    in_blocks = {id(p) for p in blocks.parameters()}
    for name, p in list(model.named_parameters()):
        if id(p) in in_blocks or p.device.type != "meta" or name not in reader.weight_map:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        t = reader.get(name)
        setattr(owner, attr, nn.Parameter(t.to(dtype) if t.is_floating_point() else t, requires_grad=False))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if id(p) not in in_blocks and p.device.type == "meta"]
    if left:
        raise CompressError(f"{reader.path}: checkpoint lacks {left[:3]} (renamed keys are not supported "
                            "by block-by-block loading; load the model whole instead)")


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Move the parameters and buffers outside the block stack (embeddings, norms, head)."""
    inside = {id(m) for m in blocks.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for name, p in m.named_parameters(recurse=False):
            if p.device.type != "meta":
                p.data = p.data.to(device)
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.device.type != "meta":
                m._buffers[name] = b.to(device)


def block_quantizer(resolved: dict[str, LayerPlan], method: str = "rtn", damp: float = 0.01,
                    act_order: bool = False, block_size: int = 128):
    """A ``quantize_block`` callback for walk_blocks: GPTQ (Hessians from the block's inputs) or RTN.

    All of a block's layers collect their Hessians in one pass over the block's inputs (the inputs
    the already-quantized earlier blocks produce), then each is quantized and swapped for a
    QuantLinear. Layers the plan keeps at 16 bits are left alone.
    """
    from .apply import set_module
    from .gptq import HessianAccumulator, gptq_quantize
    from .qlinear import QuantLinear
    from .quant import quantize

    def run(index: int, prefix: str, block: nn.Module, inputs: list[tuple[tuple, dict]]) -> None:
        targets = {name[len(prefix):]: lp for name, lp in resolved.items()
                   if name.startswith(prefix) and lp.bits != 16}
        if not targets:
            return
        accs = {}
        if method == "gptq":
            handles = []
            for local, lp in targets.items():
                layer = block.get_submodule(local)
                accs[local] = HessianAccumulator(layer.in_features, prefix + local)
                handles.append(layer.register_forward_pre_hook(accs[local].pre_hook))
            try:
                for args, kwargs in inputs:
                    block(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
        for local, lp in targets.items():
            layer = block.get_submodule(local)
            name = prefix + local
            if method == "gptq":
                qw = gptq_quantize(layer.weight.data, accs[local].hessian, lp.spec(), damp=damp,
                                   block_size=block_size, act_order=act_order, name=name)
            else:
                qw = quantize(layer.weight.data, lp.spec(), name)
            bias = layer.bias.data if layer.bias is not None else None
            set_module(block, local, QuantLinear.from_quantized(qw, bias, dtype=layer.weight.dtype))

    return run
