"""User values (numpy arrays, torch tensors, bytes) ↔ trees with :class:`~autosaved.tree.Blob` leaves.

This is the SDK side of the tree model: :func:`pack` turns what a trainer hands to ``update()`` into a
Blob tree (validating as it goes, so a bad value fails in the trainer with its path named), and
:func:`unpack` turns a restored Blob tree back into numpy arrays or torch tensors. torch is imported only
when a tensor is met or ``tensors="torch"`` is asked for, so the SDK works without it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, Final, Literal

import numpy as np

from .errors import InvalidValue
from .protocol import INLINE_LEAF_MAX, INLINE_TOTAL_MAX
from .tree import (
    DELETE,
    MSGPACK_INT_MAX,
    MSGPACK_INT_MIN,
    PLAIN_TYPES,
    TORCH_ITEMSIZE,
    Blob,
    Walked,
    path_str,
    unlink,
)

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


# A delta the event loop may encode itself (``encode(small=True)``): at most this many entries of mappings,
# lists and tuples, and no leaf that needs a copy or a device sync (about 1 ms of work at most).
SMALL_ENTRIES: Final = 2048
_BYTES_LIKE: Final = (bytes, bytearray, memoryview)


class NotSmall(Exception):
    """``encode(small=True)`` met an array, a tensor, a packed Blob, a bytes leaf too big to go inline or
    more than :data:`SMALL_ENTRIES` entries: encode this delta where blocking work may run."""


def _path(linked: Any) -> list[str | int]:
    """The key list of a linked path ``((((), k1), k2), k3)`` (built only for an error message)."""
    keys: list[str | int] = []
    while linked:
        linked, key = linked
        keys.append(key)
    return keys[::-1]


def encode(value: Any, *, allow_delete: bool = False, pinned: PinnedBuffers | None = None, inline: bool = False,
           small: bool = False) -> tuple[Any, list[Blob]]:
    """:func:`pack` and :func:`autosaved.tree.to_node` in one walk: validate a user value and encode it
    into (node, blobs), with the same rules and error messages. ``inline`` (protocol version 2): bytes
    leaves of at most :data:`~autosaved.protocol.INLINE_LEAF_MAX` bytes (up to
    :data:`~autosaved.protocol.INLINE_TOTAL_MAX` in all) become ``{"B": bytes}`` nodes instead of blobs, so a
    small update is one frame. ``small``: raise :class:`NotSmall` instead of doing blocking work (one walk
    measured 2-3x cheaper than the two it replaces for a LangGraph checkpoint: perf, issue 21)."""
    blobs: list[Blob] = []
    # [entries the walk may still visit, inline bytes still allowed]; the entries visited are added to
    # Walked.entries once at the end (a class attribute store per node cost more than the node's own work).
    budget = SMALL_ENTRIES if small else 1 << 62
    left = [budget, INLINE_TOTAL_MAX if inline else 0]

    def count(n: int) -> None:
        left[0] -= n
        if left[0] < 0:
            raise NotSmall

    def blob(b: Blob) -> dict[str, int]:
        blobs.append(b)
        return {"b": len(blobs) - 1}

    def as_is(s: Any) -> bool:
        t = type(s)
        return (t is str or s is None or t is bool or (t is int and MSGPACK_INT_MIN <= s <= MSGPACK_INT_MAX)
                or (t is float and math.isfinite(s)))

    def raw_bytes(raw: bytes) -> Any:
        if inline and len(raw) <= INLINE_LEAF_MAX and len(raw) <= left[1]:
            left[1] -= len(raw)
            return {"B": raw}
        if small:
            raise NotSmall
        data = memoryview(raw)
        return blob(Blob(kind="bytes", dtype="bytes", shape=(data.nbytes,), nbytes=data.nbytes, data=data))

    def mapping(v: Mapping[Any, Any], path: Any) -> dict[str, Any]:
        left[0] -= len(v)
        if left[0] < 0:
            raise NotSmall
        items = []
        for key, sub in v.items():
            if type(key) is not str:
                tk = type(key)
                if tk is bool or not isinstance(key, str | int):
                    raise InvalidValue(f"{path_str(_path(path))} has key {key!r} of type {tk.__name__}; "
                                       "keys must be str or int")
                if isinstance(key, int) and not MSGPACK_INT_MIN <= key <= MSGPACK_INT_MAX:
                    raise InvalidValue(f"{path_str(_path(path))} has int key {key}, outside the 64-bit range keys "
                                       "may use")
            # The common leaves and containers without the detour through enc (a LangGraph delta is a
            # chain of one-key dicts down to a few strings and [kind, bytes] lists).
            ts = type(sub)
            if ts is str or sub is None or ts is bool:
                items.append([key, sub])
            elif ts is dict:
                items.append([key, mapping(sub, (path, key))])
            elif ts is list:
                items.append([key, {"l": sequence(sub, (path, key))}])
            elif ts is bytes:
                items.append([key, raw_bytes(sub)])
            else:
                items.append([key, sub if as_is(sub) else enc(sub, (path, key), True)])
        return {"m": items}

    def sequence(v: list[Any] | tuple[Any, ...], path: Any) -> list[Any]:
        left[0] -= len(v)
        if left[0] < 0:
            raise NotSmall
        out = []
        for i, s in enumerate(v):
            t = type(s)
            if t is str or s is None:
                out.append(s)
            elif t is bytes:
                out.append(raw_bytes(s))
            else:
                out.append(s if as_is(s) else enc(s, (path, i)))
        return out

    def enc(v: Any, path: Any, in_mapping: bool = False) -> Any:
        # The exact types of a typical delta first, then pack's checks in pack's order.
        t = type(v)
        if t is dict:
            return mapping(v, path)
        if t is list:
            return {"l": sequence(v, path)}
        if t is tuple:
            return {"t": sequence(v, path)}
        if t is bytes:
            return raw_bytes(v)
        if isinstance(v, bool | str) or v is None:
            return v
        if isinstance(v, int):
            return v if MSGPACK_INT_MIN <= v <= MSGPACK_INT_MAX else {"I": str(v)}
        if isinstance(v, float):
            if math.isfinite(v):
                return v
            return {"F": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
        if isinstance(v, Blob):  # packed already: the lazy mode packs in update() and sends later
            if small:
                raise NotSmall
            return blob(v)
        if isinstance(v, _BYTES_LIKE):
            return raw_bytes(bytes(v))
        if isinstance(v, np.ndarray):
            if small:
                raise NotSmall
            return blob(_array_blob(v, _path(path)))
        if isinstance(v, np.generic):
            item = v.item()
            if isinstance(item, bool | int | float):
                return enc(item, path)
            return blob(_array_blob(np.asarray(v), _path(path)))
        if _is_tensor(v):
            if small:
                raise NotSmall
            return blob(_tensor_blob(v, _path(path), pinned))
        if isinstance(v, Mapping):
            return mapping(v, path)
        if isinstance(v, list | tuple):  # subclasses (a namedtuple is a tuple)
            count(len(v))
            out = [enc(s, (path, i)) for i, s in enumerate(v)]
            return {"l": out} if isinstance(v, list) else {"t": out}
        if v is DELETE:
            if allow_delete and in_mapping:
                return {"x": 0}
            raise InvalidValue(
                f"{path_str(_path(path))}: autosaved.DELETE is only allowed as a value of a mapping inside update()"
            )
        raise InvalidValue(
            f"{path_str(_path(path))} is a {type(v).__module__}.{type(v).__qualname__}, which autosaved cannot "
            "store (supported: None, bool, int, float, str, bytes, list, tuple, dict, numpy arrays, torch tensors)"
        )

    try:
        return enc(value, ()), blobs
    finally:
        Walked.entries += budget - left[0]
        unlink(enc, mapping, sequence)


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
