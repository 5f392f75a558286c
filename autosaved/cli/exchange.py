"""The export format: a folder that tools without autosaved can read, and that ``import`` reads back.

``OUT/tensors.safetensors``
    every array and tensor, named by its path in the state joined with dots (``model.fc.weight``;
    list items by index), little-endian as safetensors requires. Read it with
    ``safetensors.numpy.load_file`` or ``safetensors.torch.load_file``.
``OUT/state.json``
    the rest of the state as plain JSON: an array or tensor leaf is ``{"$tensor": "<name>"}``; bytes are
    ``{"$bytes": "<base64>"}``; NaN and infinities are ``{"$float": "nan" | "inf" | "-inf"}``; arrays of a
    dtype safetensors lacks (complex) are ``{"$ndarray": {"dtype", "shape", "base64"}}``. JSON has no
    tuples or int keys: they become lists and strings here.
``OUT/autosaved.json``
    the version's facts (job, version, step, time, meta) and the lossless tree, so ``import`` restores
    tuples, int keys and dtypes exactly.

Files are written to temp names, fsynced, renamed into place and the folder fsynced: a crash never
leaves a half-written file under a final name.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..errors import AutosavedError
from ..storage.fsutil import fsync_dir, temp_name, write_fsync
from ..tree import Blob, from_node, to_node
from .common import Progress

FORMAT: Final = "autosaved-export/1"
TENSORS, STATE, INFO = "tensors.safetensors", "state.json", "autosaved.json"

# numpy dtype kind+size, and torch dtype names, to safetensors dtypes
_NUMPY_ST = {"b1": "BOOL", "u1": "U8", "i1": "I8", "i2": "I16", "u2": "U16", "i4": "I32", "u4": "U32",
             "i8": "I64", "u8": "U64", "f2": "F16", "f4": "F32", "f8": "F64"}
_TORCH_ST = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "int32": "I32",
             "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16", "bfloat16": "BF16",
             "float32": "F32", "float64": "F64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


class ExportError(AutosavedError):
    """An export folder that cannot be read back (missing file, bad header, wrong format)."""

    code = "bad_export"


@dataclass
class Tensor:
    name: str
    st_dtype: str
    shape: tuple[int, ...]
    data: memoryview


def _st_dtype(blob: Blob) -> str | None:
    if blob.kind == "torch":
        return _TORCH_ST.get(blob.dtype)
    if blob.kind == "ndarray":
        return _NUMPY_ST.get(blob.dtype[1:])
    return None


def _little_endian(blob: Blob) -> memoryview:
    assert blob.data is not None
    if blob.kind == "ndarray" and blob.dtype[0] == ">" and blob.nbytes:
        swapped = np.frombuffer(blob.data, dtype=np.dtype(blob.dtype)).astype(np.dtype("<" + blob.dtype[1:]))
        return memoryview(swapped.tobytes())
    return blob.data


def _name(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path) or "state"


def plan(tree: Any) -> tuple[Any, list[Tensor]]:
    """The plain-JSON view of ``tree`` and the tensors that go into the safetensors file."""
    tensors: list[Tensor] = []
    taken: set[str] = set()

    def conv(v: Any, path: list[str | int]) -> Any:
        if isinstance(v, Blob):
            assert v.data is not None, "blob data must be loaded before an export"
            st = _st_dtype(v)
            if v.kind == "bytes":
                return {"$bytes": base64.b64encode(v.data).decode()}
            if st is None:
                return {"$ndarray": {"dtype": v.dtype, "shape": list(v.shape),
                                     "base64": base64.b64encode(v.data).decode()}}
            name, n = _name(path), 1
            while name in taken:  # keys with dots can collide with nested keys: keep names unique
                n += 1
                name = f"{_name(path)}~{n}"
            taken.add(name)
            tensors.append(Tensor(name, st, v.shape, _little_endian(v)))
            return {"$tensor": name}
        if isinstance(v, Mapping):
            return {str(k): conv(s, [*path, k]) for k, s in v.items()}
        if isinstance(v, list | tuple):
            return [conv(s, [*path, i]) for i, s in enumerate(v)]
        if isinstance(v, float) and not math.isfinite(v):
            return {"$float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
        return v

    return conv(tree, []), tensors


def safetensors_header(tensors: list[Tensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.st_dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.data.nbytes]}
        offset += t.data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data that follows starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _commit(out: Path, name: str, pieces: list[bytes | memoryview], progress: Callable[[int], None] | None) -> None:
    tmp = temp_name(out, name)
    # Private: an export may be another user's state (root exporting it) or hold secrets.
    write_fsync(tmp, pieces, mode=0o600, pace=progress)
    try:
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_export(tree: Any, info: dict[str, Any], out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Write ``tree`` (blob data loaded) and ``info`` into folder ``out``; returns a summary. The files
    are 0600 and a folder this creates is 0700 (an existing one keeps its mode: the user chose it)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    plain, tensors = plan(tree)
    node, blobs = to_node(tree)
    names = iter(t.name for t in tensors)
    records = []
    for blob in blobs:
        rec = blob.descriptor()
        if blob.kind != "bytes" and _st_dtype(blob) is not None:
            rec["tensor"] = next(names)
        else:
            assert blob.data is not None
            rec["base64"] = base64.b64encode(blob.data).decode()
        records.append(rec)
    header = safetensors_header(tensors, {"format": "pt", "autosaved_job": str(info.get("job")),
                                          "autosaved_version": str(info.get("version"))})
    if progress is not None:
        progress.total = len(header) + sum(t.data.nbytes for t in tensors)
    _commit(out, TENSORS, [header, *(t.data for t in tensors)], progress)
    _commit(out, STATE, [json.dumps(plain, indent=1, ensure_ascii=False, allow_nan=False).encode() + b"\n"], None)
    doc = {"format": FORMAT, **info, "tree": node, "blobs": records}
    _commit(out, INFO, [json.dumps(doc, indent=1, allow_nan=False).encode() + b"\n"], None)
    fsync_dir(out)
    return {**info, "out": str(out), "files": [TENSORS, STATE, INFO], "tensors": len(tensors),
            "tensor_bytes": sum(t.data.nbytes for t in tensors)}


def _read_safetensors(path: Path) -> tuple[dict[str, Any], int]:
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 * 1024 * 1024:
                raise ExportError(f"{path}: safetensors header of {n} bytes is not plausible")
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise ExportError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ExportError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n


def read_export(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The exact tree (Blob leaves with data) and the version facts of an export folder."""
    try:
        doc = json.loads((folder / INFO).read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder} is not an autosaved export: {INFO} is missing") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder / INFO}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ExportError(f"{folder / INFO}: format {doc.get('format') if isinstance(doc, dict) else None!r} "
                          f"is not {FORMAT!r}")
    header, data_start = _read_safetensors(folder / TENSORS)
    blobs: list[Blob] = []
    try:
        with (folder / TENSORS).open("rb") as fh:
            for rec in doc["blobs"]:
                kind, dtype, shape, nbytes = Blob.check_descriptor(
                    {k: rec.get(k) for k in ("kind", "dtype", "shape", "nbytes")})
                if "tensor" in rec:
                    begin, end = header[rec["tensor"]]["data_offsets"]
                    if end - begin != nbytes:
                        raise ExportError(f"tensor {rec['tensor']!r} has {end - begin} bytes, expected {nbytes}")
                    fh.seek(data_start + begin)
                    raw = fh.read(nbytes)
                    if len(raw) != nbytes:
                        raise ExportError(f"{folder / TENSORS} is truncated at tensor {rec['tensor']!r}")
                    if kind == "ndarray" and dtype[0] == ">" and nbytes:
                        raw = np.frombuffer(raw, dtype=np.dtype("<" + dtype[1:])).astype(np.dtype(dtype)).tobytes()
                else:
                    raw = base64.b64decode(rec["base64"], validate=True)
                blobs.append(Blob(kind=kind, dtype=dtype, shape=shape, nbytes=nbytes, data=memoryview(raw)))
        tree = from_node(doc["tree"], blobs)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{folder}: export is inconsistent ({exc})") from None
    info = {k: v for k, v in doc.items() if k not in ("format", "tree", "blobs")}
    return tree, info

