"""Sensitivity analysis in bounded memory: weights streamed from the checkpoint one block at a time.

The model is built on the meta device (compress.walker.empty_model); only what lies outside the
block stack (embeddings, final norm, output head) is loaded. A block's weights are read from the
safetensors checkpoint (byte ranges, compress.safetensors_io) when the walk reaches it and dropped
back to meta after, so one block of full-precision weights is resident at a time. What crosses
blocks (hidden states per calibration batch, trial states, output gradients) lives in a
StateStore: memory up to a budget, disk beyond (compress.analyze.store).

How each block sees its inputs: one forward with every block replaced by a stand-in records the
arguments the model passes to each block (attention masks, rotary tables; per block, so models
that alternate masks are served) and checks the model hands each block's output to the next
unchanged. A block then runs directly on a stored hidden state; the model's own code after the
blocks (final norm, head, soft-capping) runs by a forward whose stand-ins feed it a final state.

The methods compute exactly what their in-memory versions do, in the same order (equal scores up
to float rounding; compress.analyze.calib / perturb / gradient / cmpq define them):

- oracle, pmpq, tdmpq: units grouped by their block, in unit order; a group's trials run the
  perturbed block from its recorded inputs, then walk the later blocks together (each loaded once
  per group), then the tail. A unit outside the blocks re-runs from the embeddings when it
  changes the first block's input, else only the tail.
- taylor, fisher: a forward walk keeps each block's inputs; the tail gives each loss's gradient
  with respect to the last hidden state; then, last block first, each block is reloaded, re-run
  with gradients on and backpropagated into: its weights' gradients are reduced to per-width
  damage as soon as the block is done (GradientSums.close), never stored whole.
- cmpq: the block and linear outputs are pooled during one walk.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CompressError
from ..models import BlockList, LoadedModel, block_stack
from ..safetensors_io import CheckpointReader
from .base import UnitMap


class _Stop(Exception):
    """Raised by a stand-in to end a forward pass once what it records is recorded."""


@dataclass
class StreamedModel(LoadedModel):
    """A LoadedModel whose blocks are on the meta device, read from ``reader`` when needed.

    device: where blocks run; dtype: the weights' dtype once loaded (float32, as load_model);
    state_budget: bytes of block states kept in memory (None: half the available memory);
    offload_dir: where the rest go (None: the temporary directory, $TMPDIR).
    """

    reader: object = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    state_budget: int | None = None
    offload_dir: Path | None = None


class _RenamedReader:
    """A CheckpointReader seen under the model's parameter names (a base model's checkpoint read
    into a model with a head: "h.0.attn..." for "transformer.h.0.attn...")."""

    def __init__(self, reader: CheckpointReader, names: dict[str, str]) -> None:
        self.reader, self.names, self.path = reader, names, reader.path
        self.weight_map = {ours: reader.weight_map[theirs] for ours, theirs in names.items()}

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.reader.get(self.names.get(name, name), device)


def match_checkpoint(model: nn.Module, reader: CheckpointReader) -> _RenamedReader:
    """The checkpoint's tensor for every parameter of ``model`` (exact name, or with the model's
    base_model_prefix removed or added), shapes checked; CompressError naming the parameters the
    checkpoint lacks (with some of the names it holds instead) before anything is loaded."""
    have = set(reader.entries)
    prefix = getattr(model, "base_model_prefix", "") or ""
    names, missing = {}, []
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # a tied head once
    for name in expected:
        options = [name]
        if prefix:
            options += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
        found = next((o for o in options if o in have), None)
        if found is None:
            missing.append(name)
        else:
            names[name] = found
    if missing:
        extra = sorted(have - set(names.values()))
        instead = f"; it holds {len(extra)} tensors the model lacks, e.g. {extra[:3]}" if extra else ""
        raise CompressError(f"{reader.path}: the checkpoint's tensor names do not match {type(model).__name__}: "
                            f"{len(missing)} of its {len(expected)} parameters are missing, e.g. {missing[:3]}"
                            f"{instead}")
    for name, theirs in names.items():
        if reader.shape(theirs) != expected[name]:
            raise CompressError(f"{reader.path}: checkpoint tensor {theirs} has shape {reader.shape(theirs)}, "
                                f"{type(model).__name__} expects {expected[name]} for {name}")
    return _RenamedReader(reader, names)


def load_streamed(name_or_path: str | Path, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32, state_budget: int | None = None,
                  offload_dir: str | Path | None = None) -> StreamedModel:
    """A model ready for streamed analysis: built on meta, everything outside the blocks loaded
    onto ``device`` (default cpu), the checkpoint's names checked against the model's."""
    from ..models import load_config, load_tokenizer, model_kind, resolve_model_path
    from ..walker import _move_outside, empty_model, fix_malloc_mmap_threshold, load_outside_blocks

    fix_malloc_mmap_threshold()  # before anything large: freed blocks go back to the system
    path = resolve_model_path(name_or_path)
    kind = model_kind(load_config(path))
    model = empty_model(path, kind)
    if hasattr(model, "tie_weights"):  # a tied head is then one parameter, which checkpoints store once
        model.tie_weights()
    reader = match_checkpoint(model, CheckpointReader(path))
    blocks = block_stack(model)
    load_outside_blocks(model, blocks.modules, reader, dtype)
    where = torch.device(device) if device is not None else torch.device("cpu")
    _move_outside(model, blocks.modules, where)
    return StreamedModel(model, load_tokenizer(path), kind, path, reader=reader, device=where, dtype=dtype,
                         state_budget=state_budget, offload_dir=Path(offload_dir) if offload_dir else None)


class BlockLoader:
    """Loads one block of a StreamedModel at a time (``with loader.block(i) as block``)."""

    def __init__(self, lm: StreamedModel) -> None:
        self.lm = lm
        self.stack: BlockList = block_stack(lm.model)
        self.blocks = self.stack.modules

    def block_of(self, linear_name: str) -> int | None:
        return self.stack.block_of(linear_name)

    @contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        from ..walker import materialize

        block = self.blocks[i]
        materialize(block, f"{self.stack.name}.{i}.", self.lm.reader, self.lm.device, self.lm.dtype)
        _move_buffers(block, self.lm.device)
        try:
            yield block
        finally:
            _unload(block)


def _move_buffers(module: nn.Module, device) -> None:
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.device.type != "meta":
                m._buffers[name] = b.to(device)


def _unload(module: nn.Module) -> None:
    """Every parameter back to meta (same shape and dtype): the weights' memory is freed."""
    for name, p in list(module.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, attr, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))


def unit_values(lm: StreamedModel, units: dict[str, list[str]], fn: Callable[[list[nn.Module]], object],
                progress: bool = False) -> dict[str, object]:
    """fn(the unit's linears, weights loaded) for every unit, one block loaded at a time; for the
    planner's per-width quantization noise of rank-only methods."""
    loader = BlockLoader(lm)
    where: dict[int | None, list[str]] = {}
    for unit, names in units.items():
        idx = {loader.block_of(n) for n in names}
        if len(idx) != 1:
            raise CompressError(f"unit {unit} spans blocks {sorted(map(str, idx))}: units lie within one block")
        where.setdefault(idx.pop(), []).append(unit)
    out = {}
    for idx in tqdm(sorted(where, key=lambda i: -1 if i is None else i), desc="quantization noise",
                    disable=not progress, leave=False):
        if idx is None:
            for unit in where[idx]:
                out[unit] = fn([lm.model.get_submodule(n) for n in units[unit]])
            continue
        with loader.block(idx):
            for unit in where[idx]:
                out[unit] = fn([lm.model.get_submodule(n) for n in units[unit]])
    return {u: out[u] for u in units}


class _StandIn(nn.Module):
    """Takes a block's place for one forward pass: ``fn(index, args, kwargs)`` decides. Attributes
    the model's loop reads from its layers (Gemma's ``decoder_layer.attention_type``, which picks
    the layer's mask) come from the block it stands in for."""

    def __init__(self, index: int, fn, block: nn.Module) -> None:
        super().__init__()
        self.index, self.fn = index, fn
        object.__setattr__(self, "_block", block)  # not a submodule: its parameters stay out of view

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        return self.fn(self.index, args, kwargs)


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool, tuple, dict]:
    """(hidden state, passed positionally?, the other positional args, the keyword args)."""
    if args:
        return args[0], True, tuple(args[1:]), dict(kwargs)
    kw = dict(kwargs)
    return kw.pop("hidden_states"), False, (), kw


class BlockRunner(BlockLoader):
    """Runs the blocks of a StreamedModel one at a time on stored hidden states (module docstring).

    prepare() records every batch's first-block input in ``store`` under ("h", 0, b), each
    block's other arguments, the blocks' output type, and which quantizable linears outside the
    blocks run before the first block.
    """

    def __init__(self, lm: StreamedModel, units: UnitMap, calib, store) -> None:
        super().__init__(lm)
        if units.blocks is not None and units.blocks.name != self.stack.name:
            raise CompressError(f"the analyzer's block stack {units.blocks.name} is not the checkpoint walk's "
                                f"{self.stack.name}: streamed analysis cannot serve this model")
        self.units, self.calib, self.store = units, calib, store
        self.device = lm.device
        self.n_blocks = len(self.blocks)
        self.n_batches = len(calib.batches)
        self.tuple_len: int | None = None
        self.args: list[list[tuple[bool, tuple, dict]]] = [[] for _ in range(self.n_blocks)]
        self.before_blocks: set[str] = set()
        self.current = [0]  # the batch being run, for hooks that pool per batch (cmpq)

    @contextmanager
    def _stand_ins(self, fn) -> Iterator[None]:
        saved = list(self.blocks)
        try:
            for i in range(len(saved)):
                self.blocks[i] = _StandIn(i, fn, saved[i])
            yield
        finally:
            for i, m in enumerate(saved):
                self.blocks[i] = m

    def _format(self, hidden: torch.Tensor):
        return hidden if self.tuple_len is None else (hidden,) + (None,) * (self.tuple_len - 1)

    def _forward_until_stop(self, b: int) -> None:
        try:
            self.calib.forward(self.lm.model, b)
        except _Stop:
            return
        raise CompressError(f"{type(self.lm.model).__name__} never called its blocks ({self.stack.name})")

    def first_input(self, b: int) -> torch.Tensor:
        """Batch b's input to the first block (B, T, C), on the device, as the model is now (with
        its autograd graph when gradients are on)."""
        found: list[torch.Tensor] = []

        def record(i, args, kwargs):
            found.append(_split(args, kwargs)[0])
            raise _Stop

        with self._stand_ins(record):
            self._forward_until_stop(b)
        return found[0]

    @torch.no_grad()
    def first_inputs(self) -> list[torch.Tensor]:
        """Every batch's input to the first block (B, T, C), on the device, as the model is now."""
        return [self.first_input(b).detach() for b in range(self.n_batches)]

    @torch.no_grad()
    def prepare(self) -> None:
        outside = {n: m for n, m in self.units.linears.items() if self.block_of(n) is None}
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: self.before_blocks.add(n))
                 for n, m in outside.items()]
        try:
            first = self.first_inputs()
        finally:
            for h in hooks:
                h.remove()
        for b, h in enumerate(first):
            self.store.put(("h", 0, b), h)
        last = self.n_blocks - 1
        with self.block(0) as block:  # the blocks' output type, from a real call
            probe = []

            def once(i, args, kwargs):
                probe.append(_split(args, kwargs))
                raise _Stop

            with self._stand_ins(once):
                self._forward_until_stop(0)
            hidden, positional, rest, kw = probe[0]
            out = block(hidden, *rest, **kw) if positional else block(*rest, **{**kw, "hidden_states": hidden})
            self.tuple_len = len(out) if isinstance(out, tuple) else None
        previous: list[torch.Tensor | None] = [None]

        def record(i, args, kwargs):
            hidden, positional, rest, kw = _split(args, kwargs)
            if i > 0 and not (hidden is previous[0] or torch.equal(hidden, previous[0])):
                raise CompressError(f"{type(self.lm.model).__name__} changes the hidden states between blocks "
                                    f"{i - 1} and {i}: streamed analysis cannot replay it; analyze in memory")
            self.args[i].append((positional, rest, kw))
            previous[0] = hidden
            if i == last:
                raise _Stop
            return self._format(hidden)

        with self._stand_ins(record):
            for b in range(self.n_batches):
                self._forward_until_stop(b)

    def run_block(self, i: int, block: nn.Module, hidden: torch.Tensor, b: int) -> torch.Tensor:
        """Block i's output hidden state (B, T, C) for batch b from its input ``hidden``."""
        positional, rest, kw = self.args[i][b]
        out = block(hidden, *rest, **kw) if positional else block(*rest, **{**kw, "hidden_states": hidden})
        return out[0] if isinstance(out, tuple) else out

    def tail(self, hidden: torch.Tensor, b: int) -> torch.Tensor:
        """The model's output (calib.forward: logits or last hidden states) for batch b when the
        last block's output is ``hidden``."""
        def feed(i, args, kwargs):
            return self._format(hidden if i == 0 else _split(args, kwargs)[0])

        with self._stand_ins(feed):
            return self.calib.forward(self.lm.model, b)

    def get(self, key) -> torch.Tensor:
        return self.store.get(key, self.device)

    @torch.no_grad()
    def walk(self, source: str | None, first: int = 0, keys: list | None = None, keep: bool = True,
             desc: str | None = None) -> None:
        """Run blocks ``first``.. on the states (source, first, b) -> (source, i + 1, b) for every
        batch; ``keys`` instead walks states stored under (key, b) in place. keep=False drops each
        block's inputs once used."""
        for i in tqdm(range(first, self.n_blocks), desc=desc, disable=not (desc and self.calib.progress),
                      leave=False):
            with self.block(i) as block:
                for b in range(self.n_batches):
                    self.current[0] = b
                    if keys is None:
                        self.store.put((source, i + 1, b), self.run_block(i, block, self.get((source, i, b)), b))
                        if not keep:
                            self.store.pop((source, i, b))
                    else:
                        for key in keys:
                            self.store.put((key, b), self.run_block(i, block, self.get((key, b)), b))
