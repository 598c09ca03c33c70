"""safetensors files read and written one tensor at a time (the one dtype table of the toolkit).

safetensors' own ``save_file`` builds the whole file in memory and its loaders map the file; both
keep a whole checkpoint resident, which a block-by-block walk must not. The format is simple
enough to stream: 8 bytes of little-endian header length, a JSON header (padded with spaces to a
multiple of 8) naming each tensor's dtype, shape and byte range, then the tensors' little-endian
bytes in header order.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CompressError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``path`` with one tensor in flight (see the module docstring)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise CompressError(f"cannot store tensor {name} of dtype {t.dtype} in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def read_header(file: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict without __metadata__) of one safetensors file.

    Checks that the file holds every byte the header promises, so a truncated file is refused
    before any tensor is read.
    """
    try:
        size_on_disk = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CompressError(f"{file} is truncated: {size_on_disk} bytes, not even a header")
            size = int.from_bytes(raw, "little")
            if size > size_on_disk - 8:
                raise CompressError(f"{file} is truncated or corrupted: header of {size} bytes in a "
                                    f"{size_on_disk}-byte file")
            header = json.loads(f.read(size))
    except json.JSONDecodeError as exc:
        raise CompressError(f"{file}: corrupted safetensors header ({exc.msg})") from None
    except OSError as exc:
        raise CompressError(f"cannot read {file}: {exc.strerror}") from None
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + size + end > size_on_disk:
        raise CompressError(f"{file} is truncated: its header needs {8 + size + end:,} bytes, the file has "
                            f"{size_on_disk:,}")
    return 8 + size, header


class CheckpointReader:
    """Reads single tensors of a local checkpoint (model.safetensors or a sharded index).

    Each tensor is read with seek + readinto straight from its byte range in the file, never by
    mapping the file: a memory map keeps every page it has touched resident (and counts against a
    data-segment limit), which would bring the whole checkpoint back into memory block by block.
    """

    def __init__(self, path: Path, files: list[str] | None = None) -> None:
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if files is not None:
            pass
        elif index.is_file():
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
            base, header = read_header(file)
            for key, entry in header.items():
                self.entries[key] = (file, base, entry)
        self.weight_map = {k: v[0].name for k, v in self.entries.items()}

    @classmethod
    def single_file(cls, file: Path) -> "CheckpointReader":
        """A reader of one safetensors file (any name)."""
        return cls(Path(file).parent, [Path(file).name])

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name`` (reads nothing)."""
        if name not in self.entries:
            raise CompressError(f"{self.path}: checkpoint has no tensor {name}")
        return tuple(self.entries[name][2]["shape"])

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor ``name``, read into fresh CPU memory, then moved to ``device``."""
        if name not in self.entries:
            raise CompressError(f"{self.path}: checkpoint has no tensor {name}")
        file, base, entry = self.entries[name]
        if entry["dtype"] not in DTYPES:
            raise CompressError(f"{file}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
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

    def read_all(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint, by name."""
        return {name: self.get(name, device) for name in self.entries}
