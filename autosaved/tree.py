"""The state tree model shared by the client, the daemon and storage.

A state is a tree of mappings (keys ``str`` or ``int``), lists, tuples and scalar leaves (``None``, bool,
int, float, str); binary leaves (bytes, numpy arrays, torch tensors) are :class:`Blob` objects that carry
their dtype and shape and whose bytes travel and are stored apart from the tree.

A tree is turned into a *node*, a structure that both msgpack and JSON encode losslessly, plus a list of
blobs: every mapping, list and tuple becomes a one-key dict tagged by its kind, so a tuple comes back a
tuple and an ``int`` key comes back an ``int`` (JSON would turn it into a string, msgpack would lose
tuples). The daemon never needs numpy or torch: to it an array is an opaque :class:`Blob`.

Node tags: ``{"m": [[key, node], ...]}`` mapping, ``{"l": [...]}`` list, ``{"t": [...]}`` tuple,
``{"b": index}`` blob, ``{"F": "nan" | "inf" | "-inf"}`` non-finite float, ``{"I": "digits"}`` an int
outside 64 bits, ``{"x": 0}`` the ``DELETE`` marker (deltas only), ``{"r": node}`` a :class:`Replace`
(write-ahead log records only), ``{"B": <bytes>}`` a small bytes leaf carried in the node itself (requests of
protocol version 2 only; it decodes to a :class:`Blob` like any other, so nothing past the request sees it).
"""

from __future__ import annotations

import math
import re
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from .errors import InvalidValue, ProtocolError

MAX_DEPTH: Final = 64


class Walked:
    """How many entries of mappings, lists and tuples this process's tree walks visited (encoding,
    decoding, merging, measuring). The daemon reports it in ``status``, so a test can see, by a count
    and not a clock, that a request's work does not grow with what the daemon holds (issue 19)."""

    entries = 0
    # Entries copied by path copying (a merge into a mapping a snapshot may hold copies it first).
    copied = 0
    # Yield points of the long walks (decode, merge): once ``entries`` passes ``step_at`` a walk calls
    # ``step``. The daemon sets it (daemon/loopfirst.py: a worker thread decoding a big request waits there
    # while the event loop has work); elsewhere nothing is set and the check never fires.
    step_at = 1 << 62
    on_step: Callable[[], None] | None = None

    @staticmethod
    def step() -> None:
        if Walked.on_step is None:
            Walked.step_at = 1 << 62
        else:
            Walked.on_step()

# msgpack carries integers from -2**63 to 2**64 - 1; larger ones travel as decimal strings.
MSGPACK_INT_MIN: Final = -(2**63)
MSGPACK_INT_MAX: Final = 2**64 - 1
# The longest int a state may hold, in decimal digits (below CPython's own 4,300-digit str() limit).
MAX_INT_DIGITS: Final = 4000
INT_DIGITS: Final = re.compile(rf"-?\d{{1,{MAX_INT_DIGITS}}}")


class _DeleteMarker:
    """Sentinel: as a value in a delta mapping, removes that key from the state."""

    _instance: _DeleteMarker | None = None

    def __new__(cls) -> _DeleteMarker:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "autosaved.DELETE"

    def __reduce__(self) -> str:
        return "DELETE"


DELETE: Final = _DeleteMarker()


@dataclass(frozen=True)
class Replace:
    """In a combined delta (the daemon's write-ahead log only): set this key to ``mapping`` wholesale
    instead of merging into what it held. Clients never send it."""

    mapping: dict[str | int, Any]

BLOB_KINDS: Final = ("bytes", "ndarray", "torch")

# Item sizes of the torch dtypes we carry; numpy dtypes carry their own size in the dtype string.
TORCH_ITEMSIZE: Final = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
_NUMPY_DTYPE = re.compile(r"^[<>|=]([biufc])(\d{1,2})$")


def dtype_itemsize(kind: str, dtype: str) -> int:
    """Item size of a blob dtype, or ``ProtocolError`` when the dtype is not one autosaved carries."""
    if kind == "bytes":
        if dtype != "bytes":
            raise ProtocolError(f"bytes blob with dtype {dtype!r}")
        return 1
    if kind == "torch":
        size = TORCH_ITEMSIZE.get(dtype)
        if size is None:
            raise ProtocolError(f"unsupported torch dtype {dtype!r}")
        return size
    match = _NUMPY_DTYPE.match(dtype)
    if not match or int(match.group(2)) not in (1, 2, 4, 8, 16):
        raise ProtocolError(f"unsupported array dtype {dtype!r}")
    return int(match.group(2))


@dataclass(frozen=True)
class Chunk:
    """A content-addressed piece of a stored blob."""

    digest: str
    size: int
    # The algorithm that named it (see storage/hashing.py); old stores only ever used SHA-256.
    hash: str = "sha256"


def _held(data: memoryview | bytes | None) -> memoryview | bytes | None:
    """What a Blob keeps of ``data``: a view of a whole ``bytes`` object as that object itself (a
    memoryview and the buffer it manages cost about 230 bytes per leaf, as much as a small leaf's bytes:
    issue 20), any other view (a slot's mapping, a frame, part of a buffer) as it is."""
    if type(data) is memoryview and type(data.obj) is bytes and data.format == "B" and data.ndim == 1 \
            and data.c_contiguous and data.nbytes == len(data.obj):
        return data.obj
    return data


class Blob:
    """A binary leaf. ``data`` holds its bytes in memory; a blob loaded lazily from storage has
    ``data is None`` and ``chunks`` naming where its bytes live. Blobs are immutable once built:
    a new value for the same key is a new Blob, which is what lets snapshots share them.

    Compact (issue 20: one agent checkpoint holds four small binary leaves, and a dataclass Blob with its
    ``__dict__``, its memoryview and an empty ``digests`` dict cost ~570 bytes each beside their bytes):
    slots, bytes held as ``bytes`` (``data`` makes the view when asked), ``digests`` made on first use."""

    __slots__ = ("_data", "_digests", "_shape", "chunks", "dtype", "kind", "nbytes")
    kind: str
    dtype: str
    nbytes: int
    chunks: tuple[Chunk, ...] | None

    def __init__(self, kind: str, dtype: str, shape: tuple[int, ...], nbytes: int,
                 data: memoryview | bytes | None = None, chunks: tuple[Chunk, ...] | None = None,
                 digests: dict[int, tuple[Chunk, ...]] | None = None) -> None:
        self.kind, self.dtype, self.nbytes = kind, dtype, nbytes
        # A bytes leaf's shape is always (nbytes,): made when asked rather than a tuple kept per leaf.
        self._shape: tuple[int, ...] | None = None if kind == "bytes" and shape == (nbytes,) else shape
        self._data = _held(data)
        self.chunks = chunks
        # Hashes of the chunks of ``data`` once the writer computed them, keyed by chunk size.
        self._digests = digests

    @property
    def data(self) -> memoryview | None:
        """The bytes as a view (a new one over a held ``bytes``; ``None`` when they live only in chunks)."""
        d = self._data
        return memoryview(d) if type(d) is bytes else d  # type: ignore[return-value]

    @data.setter
    def data(self, value: memoryview | bytes | None) -> None:
        self._data = _held(value)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self._shape
        return (self.nbytes,) if shape is None else shape

    @property
    def buffer(self) -> memoryview | bytes | None:
        """The bytes as held, without making a view (a hot path's ``is None`` or mapping check)."""
        return self._data

    @property
    def digests(self) -> dict[int, tuple[Chunk, ...]]:
        d = self._digests
        if d is None:
            d = self._digests = {}
        return d

    def __repr__(self) -> str:
        held = "none" if self._data is None else type(self._data).__name__
        return f"Blob(kind={self.kind!r}, dtype={self.dtype!r}, shape={self.shape!r}, nbytes={self.nbytes}, " \
               f"data={held}, chunks={self.chunks!r})"

    def descriptor(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}

    @staticmethod
    def check_descriptor(desc: Any) -> tuple[str, str, tuple[int, ...], int]:
        """Validate an untrusted blob descriptor; returns (kind, dtype, shape, nbytes)."""
        if not isinstance(desc, dict):
            raise ProtocolError("blob descriptor must be a map")
        kind, dtype, shape, nbytes = (desc.get(k) for k in ("kind", "dtype", "shape", "nbytes"))
        if kind not in BLOB_KINDS or not isinstance(dtype, str):
            raise ProtocolError(f"bad blob kind/dtype {kind!r}/{dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise ProtocolError("blob shape must be a list of non-negative ints")
        if len(shape) > 32:
            raise ProtocolError("blob has too many dimensions")
        itemsize = dtype_itemsize(kind, dtype)
        expected = math.prod(shape) * itemsize
        if kind == "bytes" and len(shape) != 1:
            raise ProtocolError("bytes blob must be one-dimensional")
        if nbytes != expected:
            raise ProtocolError(f"blob size {nbytes!r} does not match shape {shape} of {dtype}")
        return kind, dtype, tuple(shape), expected


# Per code object of a nested walker: the indexes of its closure cells that hold the walkers (see unlink).
_WALKER_CELLS: dict[Any, tuple[int, ...]] = {}


def unlink(*walkers: Callable[..., Any]) -> None:
    """Break the reference cycle of nested functions that call themselves or each other through their
    closures, once they are done: only the cyclic garbage collector would free them. The encoders' and
    decoders' walkers were 9 to 28 such objects per request, in the client (a young collection every 25
    LangGraph puts, every few thousand a full one over the whole process) and in the daemon (perf, issue
    21). Only the cells of the walkers' own names are emptied (found once per code object: a walk of every
    cell cost a fifth of an encode): the variables they share with the enclosing function keep their
    values."""
    for walker in walkers:
        code = walker.__code__
        at = _WALKER_CELLS.get(code)
        if at is None:
            names = {w.__name__ for w in walkers}
            at = _WALKER_CELLS[code] = tuple(i for i, name in enumerate(code.co_freevars) if name in names)
        closure = walker.__closure__
        if closure is not None:
            for i in at:
                closure[i].cell_contents = None


def path_str(path: Sequence[str | int]) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


def _as_is(value: Any) -> bool:
    """Whether a leaf is its own node: a plain str, bool or None, an int msgpack carries, a finite float."""
    t = type(value)
    if t is str or t is bool or value is None:
        return True
    if t is int:
        return bool(MSGPACK_INT_MIN <= value <= MSGPACK_INT_MAX)
    return t is float and math.isfinite(value)


def to_node(tree: Any, *, allow_delete: bool = False, inline_max: int = 0,
            inline_total: int = 0) -> tuple[Any, list[Blob]]:
    """Encode a tree whose binary leaves are :class:`Blob` into (node, blobs). ``inline_max``: bytes
    leaves in memory of at most this size (``inline_total`` in all) become ``{"B": bytes}`` nodes (a reply
    to a protocol 2 request); 0: none."""
    blobs: list[Blob] = []
    left = [inline_total]

    def enc(value: Any, path: list[str | int], in_mapping: bool = False) -> Any:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            return value if MSGPACK_INT_MIN <= value <= MSGPACK_INT_MAX else {"I": str(value)}
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            return {"F": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if type(value) is Packed:
            return enc(value.open(), path, in_mapping)
        if isinstance(value, Blob):
            if (inline_max > 0 and value.kind == "bytes" and value.data is not None and value.nbytes <= inline_max
                    and value.nbytes <= left[0]):
                left[0] -= value.nbytes
                return {"B": bytes(value.data)}
            blobs.append(value)
            return {"b": len(blobs) - 1}
        if isinstance(value, Mapping):
            Walked.entries += len(value)
            if Walked.entries >= Walked.step_at:
                Walked.step()
            items = []
            for key, sub in value.items():
                if type(key) is not str:
                    if isinstance(key, bool) or not isinstance(key, str | int):
                        raise InvalidValue(
                            f"{path_str(path)} has key {key!r} of type {type(key).__name__}; keys must be str or int"
                        )
                    if isinstance(key, int) and not MSGPACK_INT_MIN <= key <= MSGPACK_INT_MAX:
                        # Found by fuzzing: msgpack cannot carry it, and failed later with an OverflowError.
                        raise InvalidValue(f"{path_str(path)} has int key {key}, outside the 64-bit range keys may use")
                # Leaves that encode as themselves need no call (and no path list) each (perf, issue 14).
                items.append([key, sub if _as_is(sub) else enc(sub, [*path, key], True)])
            return {"m": items}
        if isinstance(value, list | tuple):
            Walked.entries += len(value)
            if Walked.entries >= Walked.step_at:
                Walked.step()
        if isinstance(value, list):
            return {"l": [v if _as_is(v) else enc(v, [*path, i]) for i, v in enumerate(value)]}
        if isinstance(value, tuple):
            return {"t": [v if _as_is(v) else enc(v, [*path, i]) for i, v in enumerate(value)]}
        if isinstance(value, Replace) and allow_delete and in_mapping:
            return {"r": enc(value.mapping, path)}
        if value is DELETE:
            if allow_delete and in_mapping:
                return {"x": 0}
            raise InvalidValue(f"{path_str(path)}: autosaved.DELETE is only allowed as a value in update()")
        raise InvalidValue(
            f"{path_str(path)} is a {type(value).__module__}.{type(value).__qualname__}, which autosaved cannot "
            "store (supported: None, bool, int, float, str, bytes, list, tuple, dict, numpy arrays, "
            "torch tensors)"
        )

    try:
        return enc(tree, []), blobs
    finally:
        unlink(enc)


# The exact types msgpack and JSON decode scalars to: values of these types are leaves as they are.
PLAIN_TYPES: Final = frozenset({type(None), bool, int, float, str})


# Decoded strings up to this length are interned: a tree repeats its short strings (keys, a stage's name,
# a serializer's tag: "msgpack" four times in every LangGraph checkpoint) and each decoded copy is an
# object of its own (56 bytes and up) held as long as the state (issue 20). A unique one costs its entry
# in the interpreter's table of interned strings, dropped when the string is freed.
SHARED_STR_MAX: Final = 16
_intern = sys.intern


def inline_blob(data: bytes) -> Blob:
    """The Blob of an inline bytes leaf (``{"B": data}``)."""
    return Blob(kind="bytes", dtype="bytes", shape=(len(data),), nbytes=len(data), data=data)


def from_node(node: Any, blobs: Sequence[Blob], *, allow_delete: bool = False, allow_replace: bool = False,
              max_depth: int = MAX_DEPTH, inline_max: int = 0) -> Any:
    """Decode an untrusted node back into a tree with :class:`Blob` leaves. ``inline_max``: the largest
    ``{"B": bytes}`` leaf allowed (0: the tag is refused).

    Raises ``ProtocolError`` for anything malformed: unknown tags, bad keys, blob indexes out of range,
    nesting deeper than ``MAX_DEPTH``, a DELETE outside a mapping.
    """

    used: set[int] = set()

    def dec(n: Any, depth: int, in_mapping: bool) -> Any:
        if depth > max_depth:
            raise ProtocolError(f"state nested deeper than {max_depth} levels")
        # Exact types first: msgpack decodes to exactly these, and an isinstance with a union or an ABC
        # was a third of the daemon's decode of a LangGraph put (perf, issue 21).
        tn = type(n)
        if tn in PLAIN_TYPES:
            return _intern(n) if tn is str and len(n) <= SHARED_STR_MAX else n
        if tn is not dict:
            if isinstance(n, bool | int | float | str):
                return n
            if not isinstance(n, dict):
                raise ProtocolError(f"malformed node of type {tn.__name__}")
        if len(n) != 1:
            raise ProtocolError(f"malformed node of type {tn.__name__}")
        ((tag, body),) = n.items()
        if tag == "m" and isinstance(body, list):
            Walked.entries += len(body)
            if Walked.entries >= Walked.step_at:
                Walked.step()
            out: dict[str | int, Any] = {}
            for item in body:
                if (type(item) is not list and not isinstance(item, list | tuple)) or len(item) != 2:
                    raise ProtocolError("malformed mapping item")
                key, sub = item
                if type(key) is not str and (isinstance(key, bool) or not isinstance(key, str | int)):
                    raise ProtocolError(f"mapping key of type {type(key).__name__}")
                # A scalar leaf needs no call of its own (most of a small update is scalars: perf, issue 14);
                # the depth rule is the same as dec's.
                if type(key) is str and len(key) <= SHARED_STR_MAX:
                    key = _intern(key)
                ts = type(sub)
                if ts is str and depth + 1 <= max_depth:
                    out[key] = _intern(sub) if len(sub) <= SHARED_STR_MAX else sub
                elif ts in PLAIN_TYPES and depth + 1 <= max_depth:
                    out[key] = sub
                else:
                    out[key] = dec(sub, depth + 1, True)
            return out
        if tag in ("l", "t") and isinstance(body, list):
            Walked.entries += len(body)
            if Walked.entries >= Walked.step_at:
                Walked.step()
            # Exactly as long as the list (a comprehension's spare capacity cost 16 bytes per small list a
            # state holds: four in every LangGraph checkpoint, issue 20).
            items: list[Any] = [None] * len(body)
            for i, sub in enumerate(body):
                items[i] = dec(sub, depth + 1, False)
            return items if tag == "l" else tuple(items)
        if tag == "b" and isinstance(body, int) and not isinstance(body, bool):
            if not 0 <= body < len(blobs) or body in used:
                raise ProtocolError(f"blob reference {body} out of range or reused")
            used.add(body)
            return blobs[body]
        if tag == "B" and inline_max > 0 and type(body) is bytes and len(body) <= inline_max:
            return inline_blob(body)
        if tag == "F" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "I" and isinstance(body, str) and re.fullmatch(INT_DIGITS, body):
            return int(body)
        if tag == "I" and isinstance(body, str) and re.fullmatch(r"-?\d+", body):
            raise ProtocolError(f"an int of {len(body.lstrip('-'))} digits: at most {MAX_INT_DIGITS} are kept")
        if tag == "x" and allow_delete and in_mapping:
            return DELETE
        if tag == "r" and allow_replace and in_mapping:
            inner = dec(body, depth + 1, False)
            if not isinstance(inner, dict):
                raise ProtocolError("a replace node must hold a mapping")
            return Replace(inner)
        raise ProtocolError(f"unknown or misplaced node tag {tag!r}")

    try:
        tree = dec(node, 0, False)
    finally:
        unlink(dec)
    if len(used) != len(blobs):
        raise ProtocolError("message carries blobs the state does not reference")
    return tree


def iter_blobs(tree: Any) -> list[Blob]:
    """Every Blob of a tree, in encoding order."""
    return to_node(tree, allow_delete=True)[1]


# A Packed's header: its subtree's cost and held bytes (autosaved.state's totals) and its kind.
_PACKED_HEAD: Final = struct.Struct("<IIc")


class Packed(bytes):
    """A subtree of a daemon-held state kept in its encoded form (issue 20): one object holding the
    subtree as msgpack (its small bytes leaves inline, see :func:`pack_subtree`), behind a header with
    the subtree's totals (``cost``, ``held``) and its kind (``m``: a mapping, ``l``/``t``: a list/tuple).

    It stands for exactly the tree :meth:`open` gives, everywhere a state or a delta is read: an encoder
    encodes that tree, a merge into it merges into that tree, and it compares equal to it. Why and where
    the daemon makes them: :mod:`autosaved.state` (``PACK_WIDTH``). Not a dict or list subclass on purpose:
    a reader that does not know it sees no container to walk (and ``to_node`` without the case above
    would refuse it) rather than an empty or partial one."""

    __slots__ = ()

    @property
    def cost(self) -> int:
        return _PACKED_HEAD.unpack_from(self)[0]  # type: ignore[no-any-return]

    @property
    def held(self) -> int:
        return _PACKED_HEAD.unpack_from(self)[1]  # type: ignore[no-any-return]

    @property
    def is_mapping(self) -> bool:
        return self[8] == 0x6D  # b"m"

    def open(self) -> Any:
        """The subtree, as new objects (plain dicts, lists, tuples, scalars and bytes :class:`Blob`)."""
        return _unpack(memoryview(self)[_PACKED_HEAD.size:])

    def __eq__(self, other: object) -> bool:
        if type(other) is Packed:
            return bytes.__eq__(self, other)
        return bool(self.open() == other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = bytes.__hash__

    def __repr__(self) -> str:
        return f"Packed({self.open()!r})"


def pack_subtree(value: Any, cost: int, held: int) -> Packed | None:
    """``value`` (a mapping, list or tuple whose totals are ``cost`` and ``held``) as a :class:`Packed`, or
    ``None`` when it cannot be one: it holds a leaf that is not a bytes leaf in memory of at most
    :data:`PACKED_LEAF_MAX` bytes (an array, a leaf stored only in chunk files), an int msgpack cannot
    carry, a ``DELETE`` or something no state holds."""
    if type(value) is dict or isinstance(value, Mapping):
        kind = b"m"
    elif type(value) is list:
        kind = b"l"
    elif type(value) is tuple:
        kind = b"t"
    else:
        return None
    if cost >= 1 << 32 or held >= 1 << 32:
        return None
    try:
        body = _packb(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return Packed(_PACKED_HEAD.pack(cost, held, kind) + body)


# The body of a Packed: msgpack's own encoding (all in C: a daemon packs three subtrees per LangGraph put
# and opens one per read), with extension types for what msgpack would lose: a tuple (strict types: never
# an array) and a bytes leaf. Mappings keep their key order and int keys, floats their NaN and sign.
_EXT_TUPLE: Final = 1
_EXT_BYTES: Final = 2
# The largest bytes leaf a Packed holds: a format-2 page holds leaves up to this size inline (storage's
# statepages.INLINE_MAX, which must not be smaller), so a save never has a chunk to write for one.
PACKED_LEAF_MAX: Final = 2048


def _packed_default(obj: Any) -> Any:
    t = type(obj)
    if t is tuple:
        return msgpack.ExtType(_EXT_TUPLE, _packb(list(obj)))
    if t is Blob and obj.kind == "bytes" and obj.nbytes <= PACKED_LEAF_MAX:
        data = obj.buffer
        if data is not None:
            return msgpack.ExtType(_EXT_BYTES, data if type(data) is bytes else bytes(data))
    elif isinstance(obj, dict) and t is not dict:  # a counted mapping (autosaved.state.Node)
        return dict(obj)
    raise TypeError(f"{t.__name__} is not packed")


def _packb(value: Any) -> bytes:
    out: bytes = msgpack.packb(value, use_bin_type=True, strict_types=True, default=_packed_default)
    return out


def _packed_ext(code: int, data: bytes) -> Any:
    if code == _EXT_TUPLE:
        return tuple(_unpack(data))
    if code == _EXT_BYTES:
        return inline_blob(data)
    raise ProtocolError(f"unknown packed extension {code}")


def _unpack(data: memoryview | bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_packed_ext)
