"""Big headers decoded off the event loop (autosaved/daemon/offload.py): the sliced unpack gives what
``unpack_header`` gives, errors included, and the peek reads the leading fields only. Pure, in process."""

from __future__ import annotations

import msgpack
import pytest

from autosaved.daemon.offload import PEEK_BYTES, SLICE, peek_header, unpack_sliced
from autosaved.errors import ProtocolError
from autosaved.protocol import pack_header, unpack_header
from autosaved.tree import to_node


def big_header() -> bytes:
    node, _ = to_node({"m": {str(j): {"a": j, "l": [j, [], {}]} for j in range(8000)}}, allow_delete=True)
    return pack_header({"v": 1, "op": "update", "seq": 7, "job": "j", "expires": 12.5, "tree": node, "tail": 1})


def test_the_sliced_unpack_equals_the_whole_one() -> None:
    raw = big_header()
    assert len(raw) > 10 * SLICE
    assert unpack_sliced(raw) == unpack_header(raw)
    assert unpack_sliced(memoryview(raw)) == unpack_header(raw)


@pytest.mark.parametrize("raw", [big_header()[:-3], big_header() + b"\x01", msgpack.packb([1] * 70000),
                                 b"\xc1" * 100])
def test_the_sliced_unpack_refuses_what_unpack_header_refuses(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack_header(raw)
    with pytest.raises(ProtocolError):
        unpack_sliced(raw)


def test_the_peek_reads_the_leading_scalar_fields_from_the_first_bytes_only() -> None:
    raw = big_header()
    assert peek_header(raw) == {"v": 1, "op": "update", "seq": 7, "job": "j", "expires": 12.5}
    # A field after the big one is not seen; one before a big field is.
    late = pack_header({"tree": {"x": "y" * (2 * PEEK_BYTES)}, "v": 1, "op": "update", "seq": 1})
    assert peek_header(late) == {}
    with pytest.raises(ProtocolError):
        peek_header(msgpack.packb([1, 2, 3]))


