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
