"""A validating, memory-mapped safetensors reader and a writer, for every dtype the DeepSeek-V4 checkpoints use.

The ``safetensors`` package (0.8) cannot hand fp8 / e8m0 tensors to NumPy or JAX (it looks the dtype up as a
``numpy`` attribute), so the checkpoint importer reads the file format directly. The format: 8 bytes
little-endian header length ``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}``, then the data buffer (offsets are relative to it, C order,
little endian). Files written here are readable by the ``safetensors`` package (and by PyTorch).

:class:`SafetensorsFile` checks the whole header when it opens a file: a truncated or malformed file, an
unknown dtype or a byte range that does not match its shape is a ``ValueError`` naming the tensor and
the file. :meth:`SafetensorsFile.get` returns a read-only view into a memory map, so reading one tensor
does not load the others.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2 ** 20  # the safetensors package's own limit


class SafetensorsFile:
    """One ``.safetensors`` file: ``names``, ``info(name) -> (dtype string, shape)``, ``get(name)``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        where = f"safetensors file {self.path!r}"
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError(f"{where} is truncated: {len(head)} bytes, no header length")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"{where} is truncated or not a safetensors file: header length {n}, "
                                     f"file size {size}")
                raw = f.read(n)
        except OSError as e:
            raise ValueError(f"cannot read {where}: {e}") from None
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where} has a malformed JSON header: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{where} has a malformed header (not a JSON object)")
        self.metadata = dict(header.pop("__metadata__", None) or {})
        self._data_start, self._data_len = 8 + n, size - 8 - n
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self._entries[name] = self._check_entry(name, e)
        self._map = None

    def _check_entry(self, name, e):
        where = f"tensor {name!r} in {self.path!r}"
        try:
            dt, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where} has a malformed header entry {e!r}") from None
        if dt not in DTYPES:
            raise ValueError(f"{where} has unknown dtype {dt!r} (known: {sorted(DTYPES)})")
        if any(s < 0 for s in shape) or not (0 <= begin <= end):
            raise ValueError(f"{where} has an invalid shape {shape} or data offsets {[begin, end]}")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
        if end - begin != want:
            raise ValueError(f"{where}: {end - begin} data bytes do not match dtype {dt} and shape {shape} "
                             f"({want} bytes)")
        if end > self._data_len:
            raise ValueError(f"{where} lies past the end of the file (bytes [{begin}, {end}) of a "
                             f"{self._data_len}-byte data buffer): the file is truncated")
        return dt, shape, begin, end

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        dt, shape, _, _ = self._entries[name]
        return dt, shape

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only NumPy array (a view of the memory-mapped file)."""
        dt, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, DTYPES[dt])
        if self._map is None:
            self._map = np.memmap(self.path, np.uint8, mode="r", offset=self._data_start,
                                  shape=(self._data_len,))
        return self._map[begin:end].view(DTYPES[dt]).reshape(shape)


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (NumPy arrays of any dtype in :data:`DTYPES`) to ``path``; returns the bytes written."""
    header, offset, arrays = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
    with open(os.fspath(path), "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
    return 8 + len(raw) + offset
