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

import resource
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import CompressError
from .models import block_stack
from .safetensors_io import CheckpointReader

# A pre-hook raises this to stop the forward pass once the first block's inputs are captured.
class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, nn.ModuleList) of the model's block stack (compress.models.block_stack)."""
    blocks = block_stack(model)
    return blocks.name, blocks.modules


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
                progress: bool = True, release: bool = False, reference: bool = False) -> dict:
    """Run ``quantize_block(index, prefix, block, inputs)`` on every block in order.

    batches: model inputs (dicts of tensors, e.g. input_ids / attention_mask), one per calibration
    batch. quantize_block gets the block (weights on ``device``) and its inputs as a list of
    (args, kwargs) per batch; it quantizes the block in place and returns nothing. The walker then
    runs the quantized block to produce the next block's inputs. With ``reference``, the walker also
    carries the full-precision stream (each block run before it is quantized, on the unquantized
    blocks' outputs) and calls ``quantize_block(index, prefix, block, inputs, reference_inputs)``;
    the two lists hold the same objects until a block changes (then twice the activations in memory,
    and one more block pass per batch here, besides any the callback runs on the reference). With ``reader``, meta parameters are loaded from the checkpoint just
    in time; ``release`` puts each block back on the meta device once its outputs are computed (a
    walk that only reads the blocks keeps one resident). Returns
    {"peak_rss_bytes", "peak_cuda_bytes"}.
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

    # Each block runs several times on the same captured kwargs (Hessians, outputs, the reference
    # stream): a KV cache among them would grow on every pass and later passes would attend to it.
    no_cache = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**{**no_cache, **{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}})
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not captured:
        raise CompressError("no calibration batch reached the first block")

    ref_captured = captured
    for i, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress, leave=False)):
        prefix = f"{blocks_name}.{i}."
        if reader is not None:
            materialize(block, prefix, reader, device, dtype)
        block.to(device)
        if reference:
            ref_next = _run_block(block, ref_captured)  # before the block is quantized
            before = _signature(block)
            quantize_block(i, prefix, block, captured, ref_captured)
            if ref_captured is captured and _signature(block) == before:
                captured = ref_captured = ref_next  # still one stream: nothing quantized yet
            else:
                captured, ref_captured = _run_block(block, captured), ref_next
        else:
            quantize_block(i, prefix, block, captured)
            captured = _run_block(block, captured)
        block.to("meta" if release and reader is not None else "cpu")
    _move_outside(model, blocks, "cpu")
    stats = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        stats["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return stats


def _signature(block: nn.Module) -> list:
    """What a quantizer changes: the block's modules (swapped for QuantLinear) and its parameters'
    storage (a weight replaced in place)."""
    return [(n, id(m)) for n, m in block.named_modules()] + [p.data_ptr() for p in block.parameters()]


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The next block's inputs: ``block`` run on each (args, kwargs), its hidden states put in place."""
    outputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        if args:
            outputs.append(((hidden,) + tuple(args[1:]), kwargs))
        else:  # the model passes hidden states by keyword
            outputs.append((args, {**kwargs, "hidden_states": hidden}))
    return outputs


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
