"""Tensors a streamed analysis keeps between blocks: in memory up to a budget, on disk beyond it.

A block-by-block analysis holds per calibration batch the hidden states entering each block, the
states of the trials in flight and, for the gradient methods, the output gradients walked back
through the blocks. For a large model these exceed memory (80 blocks x 32 windows x 128 tokens x
8192 wide is 10.7 GB in float32), so the store keeps what fits in ``budget`` bytes in memory
(on the CPU) and writes the rest as raw tensor files into a private temporary directory, which
is removed when the store closes, whatever happens. Files hold the tensor's bytes only (shape and
dtype stay in memory): nothing is ever unpickled.
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import DiskFullError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OffloadWarning(UserWarning):
    """A streamed analysis keeps part of its block states on disk (said once per analysis)."""


def available_memory() -> int | None:
    """Bytes this process may still allocate: the least of MemAvailable, the cgroup's memory.max
    minus its usage, and the address-space / data rlimits minus what is mapped now; None if none
    of them can be read."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    limits += _cgroup_room()
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            soft = resource.getrlimit(which)[0]
            if soft != resource.RLIM_INFINITY:
                limits.append(soft - mapped)
    except (OSError, ValueError):
        pass
    return max(0, min(limits)) if limits else None


def _cgroup_room() -> list[int]:
    """Limit minus usage of this process's memory cgroup (v2 memory.max, v1 memory.limit_in_bytes)."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2
            files = (Path("/sys/fs/cgroup") / rel / "memory.max", Path("/sys/fs/cgroup") / rel / "memory.current")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel
            files = (base / "memory.limit_in_bytes", base / "memory.usage_in_bytes")
        else:
            continue
        try:
            cap = files[0].read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:  # v1 writes "no limit" as a huge number
                out.append(int(cap) - int(files[1].read_text()))
        except (OSError, ValueError):
            pass
    return out


def default_budget() -> int:
    """Half of available_memory() (the other half for the block's weights, activations and the
    logits), or 2 GiB where nothing says how much there is."""
    free = available_memory()
    return free // 2 if free is not None else 2 << 30


class StateStore:
    """Tensors by key (see the module docstring). ``get`` returns a CPU tensor the caller must not
    modify in place (an in-memory entry is the stored tensor itself)."""

    def __init__(self, budget: int | None = None, directory: str | Path | None = None) -> None:
        self.budget = default_budget() if budget is None else int(budget)
        self.parent = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        self.used = 0  # bytes in memory
        self.on_disk = 0  # bytes in files now
        self.peak_disk = 0
        self._mem: dict = {}
        self._files: dict = {}  # key -> (path, shape, dtype)
        self._dir: Path | None = None
        self._count = 0

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key) -> bool:
        return key in self._mem or key in self._files

    def put(self, key, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` (detached, on the CPU) under ``key``, replacing what was there."""
        self.pop(key, None)
        t = tensor.detach()
        nbytes = t.numel() * t.element_size()
        if self.used + nbytes <= self.budget:
            self._mem[key] = t.to("cpu")
            self.used += nbytes
            return
        self._write(key, t.to("cpu").contiguous(), nbytes)

    def get(self, key, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor under ``key``, on ``device``."""
        if key in self._mem:
            return self._mem[key].to(device)
        path, shape, dtype = self._files[key]
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            with open(path, "rb") as f:
                f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return t.to(device)

    def pop(self, key, default=KeyError):
        """Remove ``key`` (and its file); returns nothing useful, frees its bytes."""
        if key in self._mem:
            t = self._mem.pop(key)
            self.used -= t.numel() * t.element_size()
        elif key in self._files:
            path, shape, dtype = self._files.pop(key)
            self.on_disk -= path.stat().st_size
            path.unlink()
        elif default is KeyError:
            raise KeyError(key)

    def close(self) -> None:
        """Drop every entry and remove the directory of spilled files."""
        self._mem.clear()
        self._files.clear()
        self.used = self.on_disk = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _write(self, key, t: torch.Tensor, nbytes: int) -> None:
        try:
            if self._dir is None:
                self.parent.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="compress-analysis-", dir=self.parent))
                warnings.warn(f"analysis block states exceed the {self.budget / 2**30:.2f} GiB kept in memory: "
                              f"the rest go to {self._dir} (removed when done)", OffloadWarning, stacklevel=4)
            path = self._dir / f"{self._count}.bin"
            self._count += 1
            with open(path, "wb") as f:
                if nbytes:
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            where = self._dir or self.parent
            free = shutil.disk_usage(self.parent).free
            held = self.on_disk
            self.close()
            raise DiskFullError(f"no space left on device for analysis block states in {where}: "
                                f"{held + nbytes:,} bytes needed so far, {free:,} free; the states were removed "
                                "(point TMPDIR at a larger disk, or use fewer samples)") from None
        self._files[key] = (path, tuple(t.shape), t.dtype)
        self.on_disk += nbytes
        self.peak_disk = max(self.peak_disk, self.on_disk)
