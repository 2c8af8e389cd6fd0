"""Write tensors into size-capped safetensors shards as they come, named and indexed as ``save_pretrained`` does."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from .weight_checks import check_tensors_written

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}  # what save_pretrained writes; keeps files byte-identical


def parse_size(size: int | str) -> int:
    """``"2GB"``/``"500MB"``/an int -> bytes (decimal units, as ``save_pretrained``)."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"cannot read the shard size {size!r} (e.g. '5GB', '500MB')")


class ShardWriter:
    """Write tensors into safetensors shards of at most ``max_shard_size`` bytes, as they come.

    Files are written under temporary names and renamed by ``finish`` to what ``save_pretrained``
    would produce: ``model.safetensors`` for one shard, else ``model-0000k-of-0000n.safetensors`` and
    ``model.safetensors.index.json``.
    """

    def __init__(self, directory: str, max_shard_size: int | str = "5GB"):
        self.directory = directory
        self.max_bytes = parse_size(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
        self.total_bytes = 0
        self.total_params = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue ``tensors`` for writing; one with NaN or Inf values is refused by name."""
        check_tensors_written(tensors)
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = tensor.detach().to("cpu").contiguous()
            self.pending_bytes += size
            self.total_bytes += size
            self.total_params += tensor.numel()

    def _flush(self) -> None:
        path = os.path.join(self.directory, f".shard-{len(self.shards):05d}.tmp")
        save_file(self.pending, path, metadata=SAFETENSORS_METADATA)
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def discard(self) -> None:
        """Delete the shards flushed so far (an attempt that stopped mid-way)."""
        for path, _ in self.shards:
            os.remove(path)
        self.shards, self.pending, self.pending_bytes = [], {}, 0
        self.total_bytes = self.total_params = 0

    def finish(self, total_parameters: int | None = None) -> list[str]:
        """Write what is pending, name the shards and write the index; returns the file names."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.shards[0][0], os.path.join(self.directory, SINGLE_FILE))
            return [SINGLE_FILE]
        names, weight_map = [], {}
        for k, (path, tensor_names) in enumerate(self.shards, start=1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(path, os.path.join(self.directory, name))
            names.append(name)
            weight_map.update({t: name for t in tensor_names})
        index = {"metadata": {"total_parameters": total_parameters or self.total_params, "total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names + [INDEX_FILE]
