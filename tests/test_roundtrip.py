"""Every kind of leaf goes through the real daemon and comes back exactly: live, from disk, offline."""

from __future__ import annotations

import math

import numpy as np
import pytest

import autosaved
from autosaved.testing.private import PrivateDaemon

from .test_e2e import assert_state_equal

NUMPY_DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                "float16", "float32", "float64", "complex64", "complex128"]


def sample_state() -> dict[str | int, object]:
    rng = np.random.default_rng(0)
    arrays = {name: (rng.random((3, 5)) * 100).astype(name) for name in NUMPY_DTYPES}
    return {
        "arrays": arrays,
        "zero_d": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.int32),
        "non_contiguous": np.arange(40, dtype=np.float64).reshape(5, 8)[:, ::3],
        "fortran": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        "big_endian": np.arange(6, dtype=">i4"),
        "nan": np.array([np.nan, -0.0, np.inf], dtype=np.float64),
        "scalars": [None, True, False, 0, -1, 2**70, -(2**80), 1.5, math.inf, -math.inf, "ünïcode", b"\x00\xff"],
        "tuple": (1, ("nested", 2.0), []),
        "int_keys": {0: {"step": 3}, 1: {"step": 4}, -5: "neg"},
        "mixed_keys": {"1": "string one", 1: "int one"},
        "rng": np.random.default_rng(123).bit_generator.state,
        "empty_containers": {"d": {}, "l": [], "t": ()},
        "bytes_big": bytes(range(256)) * 100,
    }


def expected_of(state: dict[str | int, object]) -> dict[str | int, object]:
    exp = dict(state)
    exp["non_contiguous"] = np.ascontiguousarray(state["non_contiguous"])  # type: ignore[arg-type]
    exp["fortran"] = np.ascontiguousarray(state["fortran"])  # type: ignore[arg-type]
    return exp


def test_every_leaf_round_trips(daemon: PrivateDaemon) -> None:
    state = sample_state()
    expected = expected_of(state)
    with autosaved.Client("rt", address=daemon.address) as c:
        c.update(state, step=1)
        assert_state_equal(c.restore(), expected)  # live, from daemon memory
        version = c.save()
        assert_state_equal(c.restore(version), expected)  # from disk, through the daemon
    assert_state_equal(autosaved.restore("rt", state_dir=daemon.state_dir), expected)  # offline
    back = autosaved.restore("rt", state_dir=daemon.state_dir)
    assert back["big_endian"].dtype == np.dtype(">i4")
    assert math.isnan(back["nan"][0]) and str(back["nan"][1]) == "-0.0"


def test_restored_arrays_are_writable(daemon: PrivateDaemon) -> None:
    with autosaved.Client("w", address=daemon.address) as c:
        c.update({"a": np.zeros(4)})
        got = c.restore()["a"]
        got[0] = 1.0  # a trainer resumes and trains in place
    assert got[0] == 1.0


def test_mutating_after_update_does_not_change_what_is_saved(daemon: PrivateDaemon) -> None:
    arr = np.zeros(1_000_000, dtype=np.float32)
    with autosaved.Client("mut", address=daemon.address, policy={"idle": "off"}) as c:
        c.update({"a": arr})
        arr[:] = 7.0
        assert (c.restore()["a"] == 0).all()
        c.save()
    assert (autosaved.restore("mut", state_dir=daemon.state_dir)["a"] == 0).all()


def test_merge_semantics(daemon: PrivateDaemon) -> None:
    with autosaved.Client("merge", address=daemon.address) as c:
        c.update({"a": {"x": 1, "y": {"deep": 1}}, "l": [1, 2], "gone": 1})
        c.update({"a": {"y": {"deeper": 2}, "z": 3}, "l": [3], "gone": autosaved.DELETE, "new": {"k": 1}})
        c.update({"a": {"x": autosaved.DELETE}, "missing": autosaved.DELETE})
        assert c.restore() == {"a": {"y": {"deep": 1, "deeper": 2}, "z": 3}, "l": [3], "new": {"k": 1}}
        c.update({"a": 5})  # a non-mapping replaces a mapping
        c.update({"a": {"again": autosaved.DELETE, "b": 1}})  # and a mapping replaces a non-mapping
        assert c.restore() == {"a": {"b": 1}, "l": [3], "new": {"k": 1}}


def test_restore_of_unknown_job_is_none(daemon: PrivateDaemon) -> None:
    with autosaved.Client("nothing-here", address=daemon.address) as c:
        assert c.restore() is None
    assert autosaved.restore("nothing-here", state_dir=daemon.state_dir) is None
    with autosaved.Client("nothing-here", address=daemon.address) as c, pytest.raises(autosaved.NotFound):
        c.restore(version=3)


def test_torch_tensors_round_trip(daemon: PrivateDaemon) -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(4, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(3, generator=gen).half(),
        "i64": torch.arange(10),
        "bool": torch.tensor([True, False]),
        "zero_d": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),
        "rng": torch.get_rng_state(),
        "grad": torch.ones(3, requires_grad=True) * 2,
    }
    with autosaved.Client("torch", address=daemon.address) as c:
        c.update({"t": tensors})
        back = c.restore(tensors="torch")["t"]
        as_numpy = c.restore()["t"]
    for name, t in tensors.items():
        got = back[name]
        assert isinstance(got, torch.Tensor) and got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got, t.detach()), name
    assert isinstance(as_numpy["f32"], np.ndarray) and as_numpy["f32"].dtype == np.float32
    assert as_numpy["zero_d"].shape == () and as_numpy["zero_d"] == np.float32(2.5)
    # numpy has no bfloat16: it comes back as a torch tensor rather than as wrong numbers
    assert isinstance(as_numpy["bf16"], torch.Tensor)
    c2 = autosaved.Client("torch", address=daemon.address)
    c2.connect()
    c2.save()
    c2.close()
    offline = autosaved.restore("torch", state_dir=daemon.state_dir, tensors="torch")["t"]
    assert all(torch.equal(offline[k], t.detach()) for k, t in tensors.items())
