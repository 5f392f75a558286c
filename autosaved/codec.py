"""User values (numpy arrays, torch tensors, bytes) ↔ trees with :class:`~autosaved.tree.Blob` leaves.

This is the SDK side of the tree model: :func:`pack` turns what a trainer hands to ``update()`` into a
Blob tree (validating as it goes, so a bad value fails in the trainer with its path named), and
:func:`unpack` turns a restored Blob tree back into numpy arrays or torch tensors. torch is imported only
when a tensor is met or ``tensors="torch"`` is asked for, so the SDK works without it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from .errors import InvalidValue
from .tree import DELETE, PLAIN_TYPES, TORCH_ITEMSIZE, Blob, path_str

TensorMode = Literal["numpy", "torch"]

# torch dtype name -> numpy dtype string, for dtypes numpy can hold bit-exactly.
_TORCH_TO_NUMPY = {
    "bool": "|b1",
    "uint8": "|u1",
    "int8": "|i1",
    "int16": "<i2",
    "uint16": "<u2",
    "int32": "<i4",
    "uint32": "<u4",
    "int64": "<i8",
    "uint64": "<u8",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "complex64": "<c8",
    "complex128": "<c16",
}


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _bytes_view(arr: Any) -> memoryview:
    """A flat byte view of a C-contiguous array, without copying."""
    view: memoryview = memoryview(arr.reshape(-1).view(np.uint8))
    return view


def _array_blob(arr: np.ndarray[Any, Any], path: list[str | int]) -> Blob:
    if arr.dtype.kind not in "biufc" or arr.dtype.hasobject:
        raise InvalidValue(f"{path_str(path)} is a numpy array of dtype {arr.dtype}, which autosaved cannot store")
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    contiguous = arr if arr.flags.c_contiguous else arr.copy(order="C")
    return Blob(
        kind="ndarray",
        dtype=contiguous.dtype.str,
        shape=tuple(int(n) for n in arr.shape),
        nbytes=int(contiguous.nbytes),
        data=_bytes_view(contiguous),
    )


# Page-locked host buffers for device tensors, by path in the state: reused from update to update.
PinnedBuffers = dict[tuple[str | int, ...], Any]


def _device_to_host(tensor: Any, path: list[str | int], pinned: PinnedBuffers) -> Any:
    """The bytes of a CUDA tensor in a reused pinned buffer: a D2H copy at full speed into memory that is
    already faulted in. Safe to reuse because update() copies every blob (into a slot or a ZeroMQ frame)
    before it returns."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    buf = pinned.get(tuple(path))
    if buf is None or buf.numel() != flat.numel():
        buf = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
        pinned[tuple(path)] = buf
    buf.copy_(flat)  # synchronous: the bytes are on the host when this returns
    return buf


def _tensor_blob(tensor: Any, path: list[str | int], pinned: PinnedBuffers | None = None) -> Blob:
    import torch

    name = str(tensor.dtype).removeprefix("torch.")
    if name not in TORCH_ITEMSIZE:
        raise InvalidValue(f"{path_str(path)} is a torch tensor of dtype {tensor.dtype}, which autosaved cannot store")
    if tensor.is_cuda and pinned is not None and tensor.numel():
        flat = _device_to_host(tensor, path, pinned)
        return Blob(kind="torch", dtype=name, shape=tuple(int(n) for n in tensor.shape),
                    nbytes=flat.numel(), data=_bytes_view(flat.numpy()))
    cpu = tensor.detach().to("cpu").contiguous()
    flat = cpu.reshape(-1).view(torch.uint8) if cpu.numel() else torch.empty(0, dtype=torch.uint8)
    return Blob(
        kind="torch",
        dtype=name,
        shape=tuple(int(n) for n in cpu.shape),
        nbytes=cpu.numel() * cpu.element_size(),
        data=_bytes_view(flat.numpy()),
    )


def pack(value: Any, *, allow_delete: bool = False, pinned: PinnedBuffers | None = None) -> Any:
    """Validate a user value and turn its binary leaves into Blobs (no copy for contiguous arrays; CUDA
    tensors through ``pinned`` buffers when given)."""

    def conv(v: Any, path: list[str | int], in_mapping: bool = False) -> Any:
        if v is None or isinstance(v, bool | int | float | str):
            return v
        if isinstance(v, Blob):  # packed already: the lazy mode packs in update() and sends later
            return v
        if isinstance(v, bytes | bytearray | memoryview):
            raw = memoryview(bytes(v)) if not isinstance(v, bytes) else memoryview(v)
            return Blob(kind="bytes", dtype="bytes", shape=(raw.nbytes,), nbytes=raw.nbytes, data=raw)
        if isinstance(v, np.ndarray):
            return _array_blob(v, path)
        if isinstance(v, np.generic):
            return v.item() if isinstance(v.item(), bool | int | float) else _array_blob(np.asarray(v), path)
        if _is_tensor(v):
            return _tensor_blob(v, path, pinned)
        if isinstance(v, Mapping):
            out: dict[str | int, Any] = {}
            for key, sub in v.items():
                if type(key) is not str and (isinstance(key, bool) or not isinstance(key, str | int)):
                    raise InvalidValue(
                        f"{path_str(path)} has key {key!r} of type {type(key).__name__}; keys must be str or int"
                    )
                # Plain scalars are most of a small update: no call (and no path list) each (perf, issue 14).
                out[key] = sub if type(sub) in PLAIN_TYPES else conv(sub, [*path, key], True)
            return out
        if isinstance(v, list):
            return [s if type(s) in PLAIN_TYPES else conv(s, [*path, i]) for i, s in enumerate(v)]
        if isinstance(v, tuple):
            return tuple(s if type(s) in PLAIN_TYPES else conv(s, [*path, i]) for i, s in enumerate(v))
        if v is DELETE:
            if allow_delete and in_mapping:
                return v
            raise InvalidValue(
                f"{path_str(path)}: autosaved.DELETE is only allowed as a value of a mapping inside update()"
            )
        raise InvalidValue(
            f"{path_str(path)} is a {type(v).__module__}.{type(v).__qualname__}, which autosaved cannot store "
            "(supported: None, bool, int, float, str, bytes, list, tuple, dict, numpy arrays, torch tensors)"
        )

    return conv(value, [])


def _blob_bytes(blob: Blob) -> memoryview:
    if blob.data is None:
        raise ValueError("blob has no data loaded")
    return blob.data


def unpack(tree: Any, *, tensors: TensorMode = "numpy") -> Any:
    """Turn a Blob tree into user values: arrays as numpy (or torch with ``tensors="torch"``)."""
    if tensors not in ("numpy", "torch"):
        raise ValueError(f"tensors must be 'numpy' or 'torch', not {tensors!r}")

    def conv(v: Any) -> Any:
        if isinstance(v, Blob):
            return blob_value(v, tensors)
        if isinstance(v, dict):
            return {k: conv(s) for k, s in v.items()}
        if isinstance(v, list):
            return [conv(s) for s in v]
        if isinstance(v, tuple):
            return tuple(conv(s) for s in v)
        return v

    return conv(tree)


def blob_value(blob: Blob, tensors: TensorMode) -> Any:
    raw = _blob_bytes(blob)
    if blob.kind == "bytes":
        return bytes(raw)
    if blob.kind == "ndarray" and tensors == "numpy":
        # A writable array over the received buffer; copy only when the buffer is read-only.
        arr = np.frombuffer(raw, dtype=np.dtype(blob.dtype)).reshape(blob.shape)
        return arr if arr.flags.writeable else arr.copy()
    numpy_dtype = _TORCH_TO_NUMPY.get(blob.dtype) if blob.kind == "torch" else blob.dtype
    if tensors == "numpy" and numpy_dtype is not None:
        arr = np.frombuffer(raw, dtype=np.dtype(numpy_dtype)).reshape(blob.shape)
        return arr if arr.flags.writeable else arr.copy()
    return _to_torch(blob, raw)


def _to_torch(blob: Blob, raw: memoryview) -> Any:
    import torch

    if blob.kind == "ndarray":
        arr = np.frombuffer(raw, dtype=np.dtype(blob.dtype)).reshape(blob.shape)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    dtype = getattr(torch, blob.dtype)
    buf = raw if not raw.readonly else bytearray(raw)
    if blob.nbytes == 0:
        return torch.empty(blob.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(blob.shape)
