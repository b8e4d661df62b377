"""A safetensors file written one tensor at a time.

The safetensors package only saves a whole dict held in memory. Because the plan knows every shape and dtype
in advance, the header (and so every offset) can be written first and the data streamed after it, which keeps
the converter's memory at one tensor rather than one shard.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import BinaryIO

import torch

from upcycle.convert.tensor_recipe import TensorRecipe

ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


def build_header(recipes: list[TensorRecipe]) -> bytes:
    """The length-prefixed JSON header, padded to 8 bytes as the format asks."""
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for recipe in recipes:
        nbytes = math.prod(recipe.shape) * ITEMSIZE[recipe.dtype]
        entries[recipe.name] = {
            "dtype": recipe.dtype,
            "shape": list(recipe.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


class StreamingShardWriter:
    """Writes the tensors of one shard, in header order, checking each against its declared shape and dtype."""

    def __init__(self, path: Path, recipes: list[TensorRecipe]) -> None:
        self.path = path
        self.recipes = recipes
        self._next = 0
        self._handle: BinaryIO = path.open("wb")
        self._handle.write(build_header(recipes))

    def write(self, tensor: torch.Tensor) -> int:
        recipe = self.recipes[self._next]
        if tuple(tensor.shape) != recipe.shape or ITEMSIZE[recipe.dtype] != tensor.element_size():
            raise RuntimeError(
                f"{recipe.name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {recipe.shape} {recipe.dtype}"
            )
        data = tensor.contiguous().view(torch.uint8).reshape(-1) if tensor.numel() else None
        if data is not None:
            self._handle.write(memoryview(data.numpy()))
        self._next += 1
        return tensor.numel() * tensor.element_size()

    def close(self) -> None:
        if self._next != len(self.recipes):
            raise RuntimeError(f"{self.path.name}: wrote {self._next} of {len(self.recipes)} tensors")
        self._handle.flush()
        self._handle.close()

    def abort(self) -> None:
        self._handle.close()
