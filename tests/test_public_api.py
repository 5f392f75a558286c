"""``autosaved.__all__`` is the public API scripts depend on: it must be complete and importable."""

from __future__ import annotations

import inspect

import autosaved


def test_all_names_exist_and_are_public() -> None:
    for name in autosaved.__all__:
        assert hasattr(autosaved, name), name
    public = {n for n, v in vars(autosaved).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public == set(autosaved.__all__) - {"__version__"}


def test_the_api_the_issue_promises() -> None:
    sig = inspect.signature(autosaved.Client)
    assert list(sig.parameters)[:1] == ["job"] and {"address", "timeout", "policy"} <= set(sig.parameters)
    assert set(inspect.signature(autosaved.Client.update).parameters) >= {"delta", "step", "meta", "wait"}
    assert set(inspect.signature(autosaved.Client.restore).parameters) >= {"version", "tensors"}
    assert set(inspect.signature(autosaved.restore).parameters) >= {"job", "state_dir", "version"}
    for method in ("update", "save", "restore", "status"):
        assert inspect.iscoroutinefunction(getattr(autosaved.AsyncClient, method)), method
    assert issubclass(autosaved.DaemonUnavailable, autosaved.AutosavedError)
    assert issubclass(autosaved.InvalidValue, TypeError)
    assert repr(autosaved.DELETE) == "autosaved.DELETE"


def _public_methods(cls: type) -> dict[str, object]:
    return {n: m for n, m in inspect.getmembers(cls) if not n.startswith("_") and callable(m)}


def test_the_async_facades_mirror_the_blocking_ones_with_one_set_of_docstrings() -> None:
    """AsyncClient/AsyncAdmin have Client's/Admin's methods with the same parameters (awaitable, but
    ``close``), and every one has a docstring, written once on the blocking class."""
    for blocking, awaitable in ((autosaved.Client, autosaved.AsyncClient), (autosaved.Admin, autosaved.AsyncAdmin)):
        sync_methods, async_methods = _public_methods(blocking), _public_methods(awaitable)
        assert set(sync_methods) == set(async_methods), (blocking, awaitable)
        for name, method in sync_methods.items():
            twin = async_methods[name]
            assert str(inspect.signature(method)) == str(inspect.signature(twin)) or name == "__init__", name
            assert inspect.iscoroutinefunction(twin) == (name != "close"), name
            assert method.__doc__ and twin.__doc__ == method.__doc__, f"{blocking.__name__}.{name}"
        for prop in ("address",):
            assert isinstance(getattr(awaitable, prop), property)
